"""Final hidden states and the output head of any Hugging Face causal LM, without building logits.

The chunked KD loss (`distill.losses`) needs the student's final (normed) hidden states [B, T, H]
and a function `head(h) -> logits` that it can call a chunk of rows at a time. Calling
`model(...).logits` would build the [B, T, V] logits that the loss exists to avoid, so we run the
decoder body alone and rebuild exactly what the model's forward does after it:

* the output embedding (`get_output_embeddings()`): a plain Linear, a tied embedding, a bnb layer or
  a peft LoRA layer (if lm_head is a LoRA target its adapters stay in the graph and get gradients);
* the model's own logit post-processing, which several families add in their `forward` and which a
  bare lm_head misses: final-logit soft-capping (Gemma-2/3/3n/4, VaultGemma, NanoChat, ...),
  `logit_scale` (Cohere), `logits_scaling` (Granite divides, HyperCLOVA X multiplies),
  `lm_head_multiplier` (Falcon-H1), hidden states divided by `logits_scaling` before the head
  (MiniCPM3). Names read from transformers 5.24's modeling files.

Architectures not listed are assumed to apply lm_head only (true of Llama, Qwen, Mistral, Phi, ...).
`verify_head` compares head(hidden) with model(...).logits on a few tokens so that a trainer can
refuse a model whose forward does something we do not reproduce.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from distill.errors import DistillError


def unwrap_causal_lm(model):
    """The Hugging Face *ForCausalLM module inside a peft wrapper (PeftModel -> base_model.model)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    # A bare peft LoraModel (tuner) also wraps `.model`.
    if not hasattr(model, "get_output_embeddings") and hasattr(model, "model"):
        model = model.model
    return model


def decoder_body(lm):
    """The decoder stack that returns final normed hidden states (no lm_head)."""
    body = None
    if hasattr(lm, "get_decoder"):
        try:
            body = lm.get_decoder()
        except (AttributeError, NotImplementedError):
            body = None
    if body is None or body is lm:
        body = getattr(lm, "model", None)
    if body is None or body is lm:
        raise DistillError(f"{type(lm).__name__} exposes no decoder body (get_decoder() / .model); it cannot be a student")
    return body


class ModelHead:
    """head(h) -> logits exactly as the model's forward computes them from final hidden states h."""

    def __init__(self, lm):
        self.lm = lm
        self.out = lm.get_output_embeddings()
        if self.out is None:
            raise DistillError(f"{type(lm).__name__} has no output embeddings; it is not a causal LM")
        config = lm.config
        model_type = str(getattr(config, "model_type", ""))
        self.hidden_divisor = None
        self.logit_multiplier = None
        self.logit_divisor = None
        self.softcap = None
        self.softcap_module = None
        if model_type.startswith("minicpm3"):
            self.hidden_divisor = float(config.logits_scaling)
        if model_type.startswith("cohere") and getattr(lm, "logit_scale", None) is not None:
            self.logit_multiplier = lm.logit_scale
        elif model_type.startswith("granite") and getattr(config, "logits_scaling", None) is not None:
            self.logit_divisor = float(config.logits_scaling)
        elif model_type.startswith("hyperclovax") and getattr(config, "logits_scaling", None) is not None:
            self.logit_multiplier = float(config.logits_scaling)
        elif model_type.startswith("falcon_h1"):
            self.logit_multiplier = float(lm.model.lm_head_multiplier)
        if getattr(lm, "logit_softcap", None) is not None and callable(lm.logit_softcap):
            self.softcap_module = lm.logit_softcap  # Inkling2: applied to fp32 logits
        elif getattr(config, "final_logit_softcapping", None) is not None:
            self.softcap = float(config.final_logit_softcapping)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.hidden_divisor is not None:
            h = h / self.hidden_divisor
        logits = self.out(h)
        if self.logit_multiplier is not None:
            logits = logits * self.logit_multiplier
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.softcap_module is not None:
            logits = self.softcap_module(logits.float())
        elif self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits

    @property
    def width(self) -> int:
        return int(getattr(self.out, "out_features", None) or self.out.weight.shape[0])


def model_hidden_and_head(model, input_ids, attention_mask: torch.Tensor | None = None):
    """(hidden [B, T, H], head) for any HF causal LM, peft-wrapped or not, quantized or not.

    `input_ids` may also be a collated batch (a mapping with "input_ids" and "attention_mask").

    The decoder body runs with the model's own settings (gradient checkpointing included); the
    logits are not computed. `head(hidden[rows])` gives the same logits as `model(...).logits[rows]`.
    """
    if isinstance(input_ids, Mapping):
        batch = input_ids
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask", attention_mask)
    lm = unwrap_causal_lm(model)
    body = decoder_body(lm)
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, ModelHead(lm)


@torch.no_grad()
def verify_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, atol: float = 1e-3) -> float:
    """Check head(hidden) against the model's own logits on a few tokens; returns the max abs diff.

    Raises DistillError when they differ: the model's forward post-processes logits in a way this
    module does not reproduce, and training it through `model_hidden_and_head` would be wrong.
    """
    lm = unwrap_causal_lm(model)
    hidden, head = model_hidden_and_head(model, input_ids, attention_mask)
    ours = head(hidden).float()
    ref = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    if ours.shape != ref.shape:
        raise DistillError(
            f"{type(lm).__name__}: rebuilt logits have shape {tuple(ours.shape)} but the model returns "
            f"{tuple(ref.shape)}; this architecture is not supported as a student"
        )
    diff = float((ours - ref).abs().max())
    scale = float(ref.abs().max()) or 1.0
    if not diff <= atol * max(1.0, scale):
        raise DistillError(
            f"{type(lm).__name__}: head(hidden) differs from the model's logits by {diff:.3g}; its forward "
            "post-processes logits in a way distill does not reproduce, so it cannot be a student yet"
        )
    return diff
