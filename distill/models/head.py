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

Every attribute is read from the TEXT config (`config.get_text_config()`) first: a multimodal
wrapper (Gemma-3n, Gemma-4, Granite vision, ...) keeps `final_logit_softcapping` or `logits_scaling`
there, and its top-level config does not have it; reading the top level silently trained such a
student on uncapped logits that it then ran capped.

Architectures not listed are assumed to apply lm_head only (true of Llama, Qwen, Mistral, Phi, ...).
`verify_head` compares head(hidden) with model(...).logits on a few tokens; `check_head` turns the
outcome into the path a trainer takes: the chunked head when it matches, else the model's own full
logits (`rows_and_head(..., full_logits=True)`), slower and [B, T, V] in memory but correct.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

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


def text_config(config):
    """The config that holds the language model's settings: `get_text_config()` of a multimodal config."""
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            inner = get()
        except (AttributeError, ValueError, TypeError):
            inner = None
        if inner is not None:
            return inner
    return config


class ModelHead:
    """head(h) -> logits exactly as the model's forward computes them from final hidden states h."""

    def __init__(self, lm):
        self.lm = lm
        self.out = lm.get_output_embeddings()
        if self.out is None:
            raise DistillError(f"{type(lm).__name__} has no output embeddings; it is not a causal LM")
        top = lm.config
        inner = text_config(top)
        model_types = {str(getattr(c, "model_type", "")) for c in (top, inner)}

        def family(prefix: str) -> bool:
            return any(t.startswith(prefix) for t in model_types)

        def setting(name: str):
            """`name` from the text config, else from the top-level config (None when neither has it)."""
            for c in (inner, top):
                value = getattr(c, name, None)
                if value is not None:
                    return value
            return None

        self.hidden_divisor = None
        self.logit_multiplier = None
        self.logit_divisor = None
        self.softcap = None
        self.softcap_module = None
        if family("minicpm3") and setting("logits_scaling") is not None:
            self.hidden_divisor = float(setting("logits_scaling"))
        if family("cohere") and getattr(lm, "logit_scale", None) is not None:
            self.logit_multiplier = lm.logit_scale
        elif family("granite") and setting("logits_scaling") is not None:
            self.logit_divisor = float(setting("logits_scaling"))
        elif family("hyperclovax") and setting("logits_scaling") is not None:
            self.logit_multiplier = float(setting("logits_scaling"))
        elif family("falcon_h1"):
            multiplier = getattr(getattr(lm, "model", None), "lm_head_multiplier", None)
            multiplier = multiplier if multiplier is not None else setting("lm_head_multiplier")
            self.logit_multiplier = float(multiplier) if multiplier is not None else None
        if getattr(lm, "logit_softcap", None) is not None and callable(lm.logit_softcap):
            self.softcap_module = lm.logit_softcap  # Inkling2: applied to fp32 logits
        elif setting("final_logit_softcapping") is not None:
            self.softcap = float(setting("final_logit_softcapping"))

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


CHUNKED_HEAD = "chunked-head"
FULL_LOGITS = "full-logits"
HEAD_CHECK_TOKENS = 32


class LogitsHead:
    """The "head" of rows that already are logits (the model's own): the identity, with their width.

    Lets the chunked loss consume `model(...).logits` rows exactly as it consumes hidden states.
    """

    def __init__(self, width: int):
        self.width = int(width)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


def rows_and_head(model, batch, *, full_logits: bool = False):
    """(rows [B, T, X], head) for the loss: hidden states + ModelHead, or (full_logits) logits + identity.

    The full-logits path runs the model's own forward, so whatever it does to its logits is included;
    it builds the [B, T, V] logits that the chunked head avoids. Use it when `check_head` says so.
    """
    if not full_logits:
        return model_hidden_and_head(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
    return logits, LogitsHead(logits.shape[-1])


def _head_difference(model, input_ids, attention_mask, ref: torch.Tensor) -> float:
    """max |head(hidden) - ref| over the probe; DistillError when the shapes differ."""
    lm = unwrap_causal_lm(model)
    hidden, head = model_hidden_and_head(model, input_ids, attention_mask)
    ours = head(hidden).float()
    if ours.shape != ref.shape:
        raise DistillError(
            f"{type(lm).__name__}: rebuilt logits have shape {tuple(ours.shape)} but the model returns "
            f"{tuple(ref.shape)}"
        )
    return float((ours - ref).abs().max())


def _tolerance(ref: torch.Tensor, atol: float | None) -> float:
    """Allowed max |diff| for logits `ref`: atol (default 1e-3 in fp32, 3e-2 in half precision) x max(1, max |ref|)."""
    if atol is None:
        atol = 1e-3 if ref.dtype == torch.float32 else 3e-2
    return atol * max(1.0, float(ref.float().abs().max()))


@torch.no_grad()
def verify_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, atol: float | None = None) -> float:
    """Check head(hidden) against the model's own logits on a few tokens; returns the max abs diff.

    Raises DistillError when they differ: the model's forward post-processes logits in a way this
    module does not reproduce, and training it through `model_hidden_and_head` would be wrong.
    `atol` is relative to max(1, max |logit|); None picks it from the logits' dtype.
    """
    lm = unwrap_causal_lm(model)
    ref = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    diff = _head_difference(model, input_ids, attention_mask, ref.float())
    if not diff <= _tolerance(ref, atol):
        raise DistillError(
            f"{type(lm).__name__}: head(hidden) differs from the model's logits by {diff:.3g}; its forward "
            "post-processes logits in a way distill's chunked head does not reproduce"
        )
    return diff


@dataclass
class HeadCheck:
    """The logits path chosen for a model (`CHUNKED_HEAD` or `FULL_LOGITS`) and the evidence for it."""

    path: str
    tokens: int
    max_abs_diff: float | None
    tolerance: float | None
    reason: str | None = None

    @property
    def full_logits(self) -> bool:
        return self.path == FULL_LOGITS

    def to_dict(self) -> dict:
        return asdict(self)

    def message(self, what: str = "training") -> str:
        """One line for the user."""
        if not self.full_logits:
            return (f"head check: the chunked head matches the model's own logits on {self.tokens} tokens "
                    f"(max |diff| {self.max_abs_diff:.3g} <= {self.tolerance:.3g}); {what} uses it")
        return (f"warning: head check failed ({self.reason}); {what} uses the model's full logits instead: "
                "correct, but slower and with [batch, length, vocabulary] logits in memory")


@torch.no_grad()
def check_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               atol: float | None = None) -> HeadCheck:
    """Which logits path is correct for `model`, decided on a few real tokens (a 1-D or [B, T] tensor).

    The chunked head (final hidden states through `ModelHead`) is used when head(hidden) matches
    `model(...).logits`; otherwise, or when the decoder body cannot be run on its own, the model's
    own full logits are (`rows_and_head(..., full_logits=True)`): correctness beats memory. Runs in
    eval mode (LoRA dropout would make two forward passes differ) and restores the mode.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    tokens = int(attention_mask.sum())
    was_training = model.training
    model.eval()
    try:
        ref = unwrap_causal_lm(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        tol = _tolerance(ref, atol)
        try:
            diff = _head_difference(model, input_ids, attention_mask, ref.float())
        except Exception as err:  # noqa: BLE001 - any failure of the chunked path means: use full logits
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            return HeadCheck(FULL_LOGITS, tokens, None, tol, reason)
        if diff <= tol:
            return HeadCheck(CHUNKED_HEAD, tokens, diff, tol)
        return HeadCheck(FULL_LOGITS, tokens, diff, tol,
                         f"head(hidden) differs from the model's logits by {diff:.3g} > {tol:.3g}")
    finally:
        if was_training:
            model.train()
