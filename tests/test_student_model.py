"""Student loading: NF4 / int8 / unquantized base + LoRA on all linear layers, one-line load errors."""

from __future__ import annotations

import pytest
import torch

from distill.errors import DistillError
from students.model import LoraSettings, StudentSpec, load_student


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_load_student_quantized_with_lora(kd_pair, quant):
    import bitsandbytes as bnb

    _, student, _ = kd_pair
    model, tok = load_student(StudentSpec(path=str(student), quant=quant, lora=LoraSettings(r=4, alpha=8)), device="cpu")
    base_types = {type(m) for m in model.modules()}
    if quant == "nf4":
        assert bnb.nn.Linear4bit in base_types
        q = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
        assert q.weight.quant_state.nested  # double quantization
    elif quant == "int8":
        assert bnb.nn.Linear8bitLt in base_types
    else:
        assert bnb.nn.Linear4bit not in base_types and bnb.nn.Linear8bitLt not in base_types
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # All linear layers of the decoder get adapters (7 per Llama layer x 2 layers), the head does not.
    lora_modules = {n.split(".lora_")[0] for n in trainable}
    assert len(lora_modules) == 7 * 2 and not any("lm_head" in n for n in lora_modules)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert any(getattr(m, "_distill_lean", False) for m in model.modules())  # the default policy: lean layers
    ids = torch.tensor([tok.encode("Tom has 3 apples")])
    model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)


def test_lora_targets_settable(kd_pair):
    _, student, _ = kd_pair
    model, _ = load_student(StudentSpec(path=str(student), quant="none",
                                        lora=LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])), device="cpu")
    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "v_proj"}


def test_load_errors_are_one_line(tmp_path, kd_pair):
    with pytest.raises(DistillError, match="does not exist"):
        load_student(StudentSpec(path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="config.json"):
        load_student(StudentSpec(path=str(tmp_path / "empty")))
    with pytest.raises(DistillError, match="quantization"):
        load_student(StudentSpec(path=str(kd_pair[1]), quant="fp3"))
    with pytest.raises(DistillError) as err:
        load_student(StudentSpec(path=str(kd_pair[1]), lora=LoraSettings(target_modules=["no_such_layer"])), device="cpu")
    assert "\n" not in str(err.value)


def test_checkpoint_layers_parse_and_bad_ones_are_one_line(tmp_path):
    from students.model import DEFAULT_CHECKPOINT_LAYERS, checkpoint_every
    from students.train import TrainConfig
    from distill.options import validate

    from students.model import checkpoint_policy

    assert checkpoint_policy(DEFAULT_CHECKPOINT_LAYERS) == (0, True)
    assert [checkpoint_every(v) for v in ("all", "every:1", "every:3")] == [1, 1, 3]
    assert [checkpoint_policy(v) for v in ("lean", "lean+every:3", "every:2+lean", "lean+all")] == [
        (0, True), (3, True), (2, True), (1, True)]
    for bad in ("every:0", "every:x", "some", "none", "lean+lean", "every:2+every:3", "lean+", "lean+every:-1"):
        with pytest.raises(DistillError, match="--checkpoint-layers"):
            checkpoint_every(bad)
    with pytest.raises(DistillError, match="--checkpoint-layers"):
        StudentSpec(path="x", checkpoint_layers="half")
    with pytest.raises(DistillError, match="checkpoint.layers 'half'"):
        validate(TrainConfig(student="s", cache="c", out=tmp_path, checkpoint_layers="half"))


def _step_under_policy(student, policy: str, dropout: float, count_saved):
    """One NF4 student forward + backward under checkpointing `policy` (seeded): the model, its loss, the
    bytes `count_saved(tensor, kept)` tallies in `kept` for the backward, and the LoRA gradients."""
    torch.manual_seed(0)
    spec = StudentSpec(path=str(student), quant="nf4", gradient_checkpointing=policy != "none",
                       checkpoint_layers="all" if policy == "none" else policy,
                       lora=LoraSettings(r=4, alpha=8, dropout=dropout))
    model, tok = load_student(spec, device="cpu")
    model.train()
    kept = {}

    def pack(t):
        count_saved(t, kept)
        return t

    ids = torch.tensor([tok.encode("Tom has 3 apples and buys 4 more") * 4])
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, loss.item(), sum(kept.values()), grads


def test_checkpointing_every_other_layer_saves_part_of_the_activations_and_keeps_the_gradients(kd_pair):
    """Which layers recompute changes time and memory, never the math: the LoRA gradients of
    none / every:2 / all agree, and the activations kept for the backward shrink in that order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    def every_tensor(t, kept):  # tensors the forward keeps for the backward (a checkpointed layer keeps its input)
        kept[len(kept)] = t.numel() * t.element_size()

    _, student, _ = kd_pair
    grads, saved, losses = {}, {}, {}
    for policy in ("none", "every:2", "all"):
        model, losses[policy], saved[policy], grads[policy] = _step_under_policy(student, policy, 0.0, every_tensor)
        flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert flags == {"none": [False, False], "every:2": [True, False], "all": [True, True]}[policy]
    assert saved["none"] > saved["every:2"] > saved["all"]
    for policy in ("every:2", "all"):
        assert losses[policy] == pytest.approx(losses["none"], rel=1e-6)
        for name, g in grads["none"].items():
            torch.testing.assert_close(grads[policy][name], g, rtol=1e-4, atol=1e-6)


def test_lean_layers_keep_less_and_give_the_same_gradients(kd_pair):
    """`lean` recomputes act(gate), act(gate) * up, the norms' outputs and the LoRA dropout's noise and
    output in the backward pass instead of storing them: less kept, same loss and gradients as no
    checkpointing, alone and with every other layer checkpointed whole, dropout on (same masks)."""

    def unique_storages(t, kept):  # unique storages kept for the backward (a recipe is not a tensor)
        if isinstance(t, torch.Tensor):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    _, student, _ = kd_pair
    grads, saved, losses = {}, {}, {}
    for policy in ("none", "lean", "lean+every:2"):
        _, losses[policy], saved[policy], grads[policy] = _step_under_policy(student, policy, 0.1, unique_storages)
    assert saved["none"] > 1.3 * saved["lean"] and saved["lean"] > saved["lean+every:2"]
    for policy in ("lean", "lean+every:2"):
        assert losses[policy] == pytest.approx(losses["none"], rel=1e-6)
        for name, g in grads["none"].items():
            torch.testing.assert_close(grads[policy][name], g, rtol=1e-5, atol=1e-7)
