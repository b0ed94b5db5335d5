"""head(hidden) must give exactly the model's own logits: lm_head plus its logit scaling/soft-capping."""

from __future__ import annotations

import pytest
import torch

from distill.errors import DistillError
from distill.losses import KDLossConfig, distillation_loss_sums
from helpers import tiny_gemma4_multimodal, tiny_llama, tiny_tokenizer
from distill.models.head import (CHUNKED_HEAD, FULL_LOGITS, LogitsHead, check_head, model_hidden_and_head, rows_and_head,
                           unwrap_causal_lm, verify_head)

V = 320


def _inputs(seed=0, b=2, t=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding, as in the collated cache batch
    return ids, mask


def _gemma(kind: str, softcap: float = 2.0):
    if kind == "gemma2":
        from transformers import Gemma2Config as Config, Gemma2ForCausalLM as Model
    else:
        from transformers import Gemma3ForCausalLM as Model, Gemma3TextConfig as Config
    config = Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        final_logit_softcapping=softcap,
    )
    torch.manual_seed(0)
    model = Model(config).eval()
    with torch.no_grad():  # make raw logits far larger than the cap, so capping really matters
        model.get_output_embeddings().weight.mul_(200.0)
    return model


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def test_tiny_llama_head_equals_model_logits_exactly():
    model = tiny_llama(tiny_tokenizer())
    ids, mask = _inputs()
    with torch.no_grad():
        hidden, head = model_hidden_and_head(model, ids, mask)
        assert hidden.shape == (2, 9, 32)
        assert torch.equal(head(hidden), _logits(model, ids, mask))
        # a collated batch (mapping) works too
        hidden2, _ = model_hidden_and_head(model, {"input_ids": ids, "attention_mask": mask, "targets": ids})
        assert torch.equal(hidden2, hidden)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_softcapped_gemma_head_equals_model_logits_exactly(kind):
    model = _gemma(kind)
    ids, mask = _inputs(1)
    with torch.no_grad():
        hidden, head = model_hidden_and_head(model, ids, mask)
        ref = _logits(model, ids, mask)
        assert torch.equal(head(hidden), ref)
        assert ref.abs().max() <= 2.0
        bare = model.get_output_embeddings()(hidden)
        assert (bare - ref).abs().max() > 1.0  # a bare lm_head would be wrong for this model
    assert verify_head(model, ids, mask) == 0.0


def test_granite_and_cohere_scaling_are_applied():
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    ids, mask = _inputs(2)
    for model in (GraniteForCausalLM(GraniteConfig(logits_scaling=7.0, **common)), CohereForCausalLM(CohereConfig(logit_scale=0.125, **common))):
        model.eval()
        with torch.no_grad():
            hidden, head = model_hidden_and_head(model, ids, mask)
            ref = _logits(model, ids, mask)
            assert torch.equal(head(hidden), ref)
            assert not torch.allclose(model.get_output_embeddings()(hidden), ref)


def test_softcap_kept_in_the_text_config_is_applied():
    """Gemma-3n/4 multimodal: the cap is in config.get_text_config() only; the head must still apply it."""
    model = tiny_gemma4_multimodal(V)
    assert getattr(model.config, "final_logit_softcapping", None) is None
    assert model.config.get_text_config().final_logit_softcapping == 2.0
    ids, mask = _inputs(6)
    with torch.no_grad():
        hidden, head = model_hidden_and_head(model, ids, mask)
        ref = _logits(model, ids, mask)
        assert ref.abs().max() <= 2.0
        assert (model.get_output_embeddings()(hidden) - ref).abs().max() > 1.0  # uncapped would be far off
        assert torch.equal(head(hidden), ref)
    assert verify_head(model, ids, mask) == 0.0
    check = check_head(model, ids[0])
    assert check.path == CHUNKED_HEAD and check.max_abs_diff == 0.0 and check.tokens == ids.shape[1]


def _scale_logits(monkeypatch, model, factor=3.0):
    """Make the model's forward scale its logits: post-processing that ModelHead does not know."""
    original = type(model).forward

    def forward_scaled(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = out.logits * factor
        return out

    monkeypatch.setattr(type(model), "forward", forward_scaled)


def test_check_head_falls_back_to_the_models_own_logits(monkeypatch):
    model = tiny_llama(tiny_tokenizer())
    model.train()
    ids, mask = _inputs(7)
    assert check_head(model, ids, mask).path == CHUNKED_HEAD
    _scale_logits(monkeypatch, model)
    check = check_head(model, ids, mask)
    assert check.path == FULL_LOGITS and check.full_logits and check.max_abs_diff > check.tolerance
    assert "differs from the model's logits" in check.reason
    assert "warning: head check failed" in check.message() and "full logits" in check.message()
    assert model.training  # the check ran in eval mode and put the model back
    with torch.no_grad():
        rows, head = rows_and_head(model, {"input_ids": ids, "attention_mask": mask}, full_logits=True)
        assert isinstance(head, LogitsHead) and head.width == V
        assert torch.equal(head(rows), _logits(model, ids, mask))


def test_full_logits_rows_give_the_chunked_heads_loss_and_gradients():
    """Logits rows + identity head through the chunked, checkpointed loss = hidden rows + ModelHead,
    values and gradients, with logits wider than the tokenizer."""
    tok = tiny_tokenizer()
    ids, mask = _inputs(8, b=2, t=12)
    g = torch.Generator().manual_seed(8)
    targets = torch.randint(0, V, ids.shape, generator=g)
    targets[:, :3] = -100
    targets[mask == 0] = -100
    topk_ids = torch.randint(0, V, (*ids.shape, 4), generator=g)
    topk_lp = torch.log_softmax(torch.randn(*ids.shape, 4, generator=g), -1) - 0.5
    cfg = KDLossConfig(kind="forward-kl", vocab_size=V, chunk_size=5, ce_weight=0.5)  # several chunks
    results = []
    for full in (False, True):
        model = tiny_llama(tok, pad_vocab_to=V + 64)
        model.train()
        rows, head = rows_and_head(model, {"input_ids": ids, "attention_mask": mask}, full_logits=full)
        sums = distillation_loss_sums(rows, head, targets, topk_ids, topk_lp, cfg)
        (sums.kd + sums.ce).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((sums, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.kd, b.kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.ce, b.ce, rtol=1e-5, atol=1e-6)
    assert a.n_tokens == b.n_tokens > 5 and int(a.top1_agree) == int(b.top1_agree)
    assert ga.keys() == gb.keys() and len(ga) > 5
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6)


def test_verify_head_refuses_unknown_logit_postprocessing(monkeypatch):
    model = tiny_llama(tiny_tokenizer())
    ids, mask = _inputs(3)
    original = type(model).forward

    def forward_with_bias(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = out.logits + 5.0
        return out

    monkeypatch.setattr(type(model), "forward", forward_with_bias)
    with pytest.raises(DistillError, match="differs from the model's logits"):
        verify_head(model, ids, mask)


def test_peft_lora_on_lm_head_keeps_gradients():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(tiny_tokenizer())
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero; make the adapters non-trivial
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert unwrap_causal_lm(peft_model) is model
    ids, mask = _inputs(4)
    hidden, head = model_hidden_and_head(peft_model, ids, mask)
    logits = head(hidden)
    ref = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-6)
    logits.float().logsumexp(-1).sum().backward()
    lora_head = [p for n, p in peft_model.named_parameters() if "lm_head" in n and "lora_" in n]
    lora_q = [p for n, p in peft_model.named_parameters() if "q_proj" in n and "lora_" in n]
    assert lora_head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_head)
    assert lora_q and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_q)


def test_nf4_lora_student_head_matches_model(tiny_student_dir):
    pytest.importorskip("bitsandbytes")
    from students.model import LoraSettings, StudentSpec, load_student

    model, _ = load_student(StudentSpec(str(tiny_student_dir), quant="nf4", lora=LoraSettings(r=4, alpha=8, dropout=0.0)), device="cpu")
    ids, mask = _inputs(5)
    model.eval()
    with torch.no_grad():
        hidden, head = model_hidden_and_head(model, ids, mask)
        torch.testing.assert_close(head(hidden).float(), model(input_ids=ids, attention_mask=mask).logits.float(), rtol=0, atol=1e-5)
