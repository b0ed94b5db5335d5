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
    assert model.base_model.model.is_gradient_checkpointing
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
