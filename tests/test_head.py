"""head(hidden) must give exactly the model's own logits: lm_head plus its logit scaling/soft-capping."""

from __future__ import annotations

import pytest
import torch

from distill.errors import DistillError
from distill.testing import tiny_llama, tiny_tokenizer
from distill.models.head import model_hidden_and_head, unwrap_causal_lm, verify_head

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
