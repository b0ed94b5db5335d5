"""Memory planner: what one QLoRA distillation step and inference of a student need, part by part.

`distill plan` prints the table; `distill train --batch-tokens auto` takes the largest batch that fits.
The formulas are written out in docs/memory.md; this module is them, term by term. It reads only a
model config (no weights), so it plans a 7B student on a laptop.

What is exact and what is estimated:
* weights, LoRA adapters, gradients and optimizer states are counted from the shapes and the storage
  formats (bitsandbytes NF4 with double quantization, LLM.int8, fp32 adapters), so they are exact up
  to small per-tensor headers;
* activations, the loss chunk and the transients are counted from the tensors autograd saves in a
  llama-style decoder layer (listed in docs/memory.md), then checked against the trainer's measured
  peak on the CPU (benchmarks/bench_plan.py). The bf16/CUDA variant of those counts follows the same
  list with the casts autocast adds; it is checked by scripts/gpu_check_memory.py on a GPU.

The planner knows dense llama-style decoders (llama, mistral, qwen2/3, gemma 2/3, phi3, ...): q/k/v/o
attention projections and a gated MLP (gate/up/down). Mixture-of-experts configs are refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from distill.errors import DistillError

GiB = 2**30
MiB = 2**20
NF4_BLOCK = 64  # values per absmax (bitsandbytes blocksize for 4-bit)
NF4_DQ_BLOCK = 256  # absmax values per second-level fp32 scale (double quantization)
PAGED_8BIT_MIN = 4096  # bitsandbytes keeps 32-bit optimizer state for tensors smaller than this
PAGED_8BIT_BLOCK = 2048  # values per fp32 absmax of the 8-bit optimizer state
CUDA_CONTEXT = 600 * MiB  # CUDA context + cuBLAS workspaces: outside torch's allocator
ALLOCATOR_SLACK = 0.10  # reserved-but-unallocated share of the caching allocator (fragmentation)
CPU_RAM_SHARE = 0.5  # `--batch-tokens auto` on the CPU plans for half of the available RAM
QUANTS = ("nf4", "int8", "none")
OPTIMIZERS = ("adamw", "paged-adamw-8bit")


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder config that memory depends on."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    qk_norm: bool = False
    sandwich_norms: bool = False  # gemma2/3: post-attention and post-feedforward norms too

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of the projections of ONE decoder layer (the LoRA targets)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for _, a, b in self.linears())

    @property
    def other_params(self) -> int:
        """Parameters bitsandbytes leaves unquantized: embeddings, head, norms, biases."""
        norms_per_layer = (4 if self.sandwich_norms else 2) * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        bias = self.layers * (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + self.layers * norms_per_layer + self.hidden + bias

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config object or a config.json dict (the text part of a multimodal one)."""
        if not isinstance(config, dict):
            if hasattr(config, "get_text_config"):
                config = config.get_text_config()
            config = config.to_dict()
        config = dict(config.get("text_config") or config) if "hidden_size" not in config else config
        model_type = str(config.get("model_type", "?"))
        if any(config.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")):
            raise DistillError(f"the memory planner knows dense decoders; {model_type} is a mixture of experts")
        try:
            hidden, layers, heads = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["num_attention_heads"])
            intermediate, vocab = int(config["intermediate_size"]), int(config["vocab_size"])
        except (KeyError, TypeError):
            raise DistillError(f"the memory planner needs hidden_size, num_hidden_layers, num_attention_heads, "
                               f"intermediate_size and vocab_size in the config of this {model_type} model") from None
        return cls(
            model_type=model_type, hidden=hidden, layers=layers, heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=intermediate, vocab=vocab,
            tied=bool(config.get("tie_word_embeddings", model_type.startswith("gemma"))),
            attention_bias=bool(config.get("attention_bias", model_type.startswith("qwen2"))),
            qk_norm=model_type.startswith(("gemma3", "qwen3", "olmo2")),
            sandwich_norms=model_type.startswith(("gemma2", "gemma3")),
        )


def load_shape(model: str, *, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a model directory, a config.json file or a hub id (config only, no weights)."""
    import json
    from pathlib import Path

    p = Path(model).expanduser()
    if p.is_file():
        try:
            return ModelShape.from_config(json.loads(p.read_text()))
        except ValueError:
            raise DistillError(f"{p} is not a JSON config file") from None
    from distill.models import load_config

    return ModelShape.from_config(load_config(str(model), what="student", trust_remote_code=trust_remote_code))


def parse_size(text: str) -> int:
    """'24GB', '24GiB', '80G', '512MiB', '1.5TB' -> bytes (GB and GiB both mean 2**30, as GPUs are sold)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B?)?\s*", str(text).upper())
    if not m:
        raise DistillError(f"cannot read the size {text!r}; write it like 24GB, 80GiB or 512MB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]
    if m.group(2) == "" and not m.group(3):
        scale = 2**30  # a bare number is GB
    return int(float(m.group(1)) * scale)


# ----------------------------------------------------------------------------------- the parts

@dataclass
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass
class TrainingPlan:
    shape: ModelShape
    settings: dict
    parts: list[Part] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts if not p.name.startswith("("))

    def part(self, name: str) -> int:
        return next(p.bytes for p in self.parts if p.name == name)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "parts": {p.name: p.bytes for p in self.parts}, "total": self.total}


def quantized_linear_bytes(n_params: int, out_features: int, quant: str, compute_bytes: int) -> int:
    """Storage of one frozen linear weight of `n_params` values (`out_features` rows)."""
    if quant == "nf4":
        # 4-bit codes + one 8-bit absmax per 64 values + one fp32 scale per 256 absmax values
        # (double quantization) + the 256-entry fp32 code book of the second level and 16 NF4 levels.
        blocks = math.ceil(n_params / NF4_BLOCK)
        return math.ceil(n_params / 2) + blocks + 4 * math.ceil(blocks / NF4_DQ_BLOCK) + 4 * (256 + 16) + 4
    if quant == "int8":
        return n_params + 4 * out_features  # int8 codes + an fp32 scale per row (LLM.int8 SCB)
    return n_params * compute_bytes


def plan_training(shape: ModelShape, *, quant: str = "nf4", lora_r: int = 16, context: int = 4096,
                  batch_tokens: int | None = None, optimizer: str = "paged-adamw-8bit", gradient_checkpointing: bool = True,
                  compute: str = "bf16", loss_chunk: int | None = None, top_k: int = 32, lora_dropout: float = 0.05,
                  padded: bool = True, checkpoint_every: int = 1, lean: bool = False) -> TrainingPlan:
    """Bytes of each part of one training micro-step at peak (the backward pass of the loss's last chunk).

    `batch_tokens` defaults to one sequence of `context` tokens; sequences are `context` long (the
    longest sample sets the padded length). `compute` is bf16 (CUDA, autocast) or fp32 (CPU).
    `padded`: the batch carries an attention mask (real batches do: samples differ in length), which
    makes SDPA keep a [B, T, T] float mask per layer and repeat K/V over the query heads.
    `checkpoint_every`: with checkpointing, every N-th decoder layer recomputes (`--checkpoint-layers
    every:N`; 0: none); the others keep their full activations, or with `lean` (`--checkpoint-layers
    lean+every:N`) all but their cheap elementwise ones (students/recompute.py): act(gate), the
    product act(gate) * up and the norms' outputs, and on the CPU the LoRA dropout keeps a bool mask
    instead of its float noise and output.
    """
    if quant not in QUANTS:
        raise DistillError(f"--quant {quant!r} is unknown; use one of {', '.join(QUANTS)}")
    if optimizer not in OPTIMIZERS:
        raise DistillError(f"--optimizer {optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    if compute not in ("bf16", "fp16", "fp32"):
        raise DistillError(f"compute dtype {compute!r} is unknown; use bf16, fp16 or fp32")
    if lora_r < 1 or context < 1 or (batch_tokens is not None and batch_tokens < 1):
        raise DistillError("--lora-r, --context and --batch-tokens must be positive")
    b = 4 if compute == "fp32" else 2
    gpu = compute != "fp32"
    T = int(context)
    N = int(batch_tokens or T)
    B = max(1, N // T)
    N = B * T
    s = shape
    h, q, kv, I, r, L, V = s.hidden, s.q_dim, s.kv_dim, s.intermediate, lora_r, s.layers, s.vocab
    # quantized bases go through peft's prepare_model_for_kbit_training, which casts every
    # non-quantized parameter (embeddings, head, norms) to fp32: the residual stream is then fp32.
    R = 4 if quant != "none" else b
    other_bytes = R if quant != "none" else b
    plan = TrainingPlan(s, dict(quant=quant, lora_r=r, context=T, batch_tokens=N, sequences=B, optimizer=optimizer,
                                gradient_checkpointing=gradient_checkpointing, compute=compute, loss_chunk=loss_chunk,
                                top_k=top_k, lora_dropout=lora_dropout, padded=padded,
                                checkpoint_every=checkpoint_every, lean=lean))
    add = lambda name, nbytes, note="": plan.parts.append(Part(name, int(nbytes), note))  # noqa: E731

    base = L * sum(quantized_linear_bytes(a * o, o, quant, b) for _, a, o in s.linears())
    add("base weights (linear layers)", base, {"nf4": "NF4 + double-quant absmax", "int8": "int8 + fp32 row scales",
                                                "none": f"{compute}"}[quant])
    add("embeddings, head, norms", s.other_params * other_bytes,
        f"{'fp32 (prepare_model_for_kbit_training)' if quant != 'none' else compute}; head {'tied' if s.tied else 'separate'}")

    lora_sizes = [r * (a + o) for _, a, o in s.linears()] * L
    n_lora = sum(lora_sizes)
    add("LoRA adapters", 4 * n_lora, f"{n_lora:,} fp32 parameters (r={r}, all linear layers)")
    add("LoRA gradients", 4 * n_lora, "fp32")
    if optimizer == "adamw":
        add("optimizer states", 8 * n_lora, "AdamW: exp_avg + exp_avg_sq in fp32")
    else:
        small = sum(n for n in lora_sizes if n < PAGED_8BIT_MIN)
        big = n_lora - small
        paged = 2 * big + 2 * 4 * math.ceil(big / PAGED_8BIT_BLOCK) + 8 * small
        add("optimizer states", paged, "paged 8-bit AdamW: 2 bytes/parameter in CUDA unified memory "
                                       "(pageable to host RAM; not in torch.cuda.max_memory_allocated)")

    # ---- activations: bytes per token per decoder layer saved for backward (docs/memory.md)
    qa = q if padded else kv  # with a mask, transformers repeats K/V over the query heads for SDPA
    mask_bytes = 4 if compute == "fp32" else b
    p = float(lora_dropout)
    lora_inputs = 3 * h + q + 2 * h + I  # inputs of q,k,v | o | gate,up | down
    if gpu:
        # Each LoRA A gets its own bf16 copy of its input (autocast does not cache casts of
        # activations); dropout adds a bool mask (CUDA's fused dropout).
        lin_saved = lora_inputs * (b + (1 if p > 0 else 0))
    elif p > 0:
        # CPU dropout is input * noise: the noise tensor (compute dtype) and the output are both kept
        lin_saved = lora_inputs * 2 * b
    else:
        lin_saved = (h + q + h + I) * b  # q/k/v and gate/up share one input tensor
    per_layer_token = (2 * h * R  # the two RMSNorm inputs (residual stream)
                       + lin_saved
                       + 7 * r * b  # LoRA A outputs
                       + (2 * q + 2 * qa) * b + 4 * s.heads  # SDPA: q, k, v, output; fp32 logsumexp
                       + 3 * I * b  # gate, up, act(gate)
                       + (2 * h * R if s.sandwich_norms else 0) + (2 * s.head_dim * b if s.qk_norm else 0)
                       + (T * mask_bytes if padded else 0))  # the float attention mask SDPA keeps
    if gpu:  # bf16 autocast gives each LoRA A its own copy of its input: only act(gate) goes
        lean_saving = I * b
    elif p > 0:  # the noise and dropped inputs become one-byte masks; o_proj's input is SDPA's output
        lean_saving = lin_saved - (lora_inputs + q * b) + I * b
    else:  # the two norms' outputs (q/k/v and gate/up inputs), the product (down input), act(gate)
        lean_saving = (2 * h + I) * b + I * b
    per_layer_lean = per_layer_token - lean_saving
    one_layer = N * per_layer_token
    lean_layer = N * per_layer_lean if lean and gradient_checkpointing else one_layer
    grads_in_flight = N * (2 * h * R + 2 * I * b)  # gradients of the residual stream and the MLP
    if gradient_checkpointing:
        # layers 0, N, 2N, ... recompute; the others keep everything (or, lean, all but the cheap parts)
        kept = -(-L // checkpoint_every) if checkpoint_every > 0 else 0
        act = N * kept * h * R + (L - kept) * lean_layer + (one_layer if kept else 0) + grads_in_flight
        others = f"{L - kept} lean layers ({per_layer_lean / 1024:.1f} KiB/token)" if lean else f"{L - kept} full layers"
        note = (f"checkpointed: {kept} layer inputs + {others}" + (" + 1 recomputed layer" if kept else "")
                + f" (full layer {per_layer_token / 1024:.1f} KiB/token)")
    else:
        act = L * one_layer + grads_in_flight
        note = f"{per_layer_token / 1024:.1f} KiB per token per layer x {L} layers"
    act += N * 3 * h * R  # embedding output, final norm input, final hidden states
    add("activations", act, note)
    other_mode = plan_training_activations_only(s, not gradient_checkpointing, N, T, per_layer_token, R, h, L, grads_in_flight)
    add("(activations " + ("without" if gradient_checkpointing else "with") + " checkpointing)", other_mode, "for comparison, not in the total")

    if loss_chunk is None:  # the trainer's automatic size (distill.losses)
        from distill.losses import auto_chunk_rows

        loss_chunk = auto_chunk_rows(V)
    rows = min(loss_chunk, N)
    # One chunk's logits at the peak of its backward: logits, exp(logits - lse), the gradients of the
    # logsumexp and gather paths and their sum: ~5 fp32 [rows, V] tensors (measured on the CPU: 4.5 to
    # 5.5 copies, more with a CE term). Plus the valid rows' hidden states and their gradient.
    loss = rows * V * 20 + rows * h * R * 2 + N * h * R * 2
    loss_note = f"{rows} rows x {V:,} logits x ~20 bytes"
    if gpu and quant != "none":
        loss += V * h * b  # autocast's bf16 copy of the fp32 head, kept for the last chunk's backward
        loss_note += " + bf16 copy of the head"
    add("chunked loss", loss, loss_note)
    add("cache batch", N * (24 + 8) + 2 * N * top_k * 12, f"ids, mask, targets + top-{top_k} ids (int64) and log-probs (fp32), twice")
    largest = max(a * o for _, a, o in s.linears())
    add("dequantization workspace", (largest * b if quant != "none" else 0), "one linear weight dequantized at a time")
    return plan


def plan_training_activations_only(s: ModelShape, checkpointing: bool, N, T, per_layer_token, R, h, L, grads) -> int:
    """The activation figure of the other gradient-checkpointing mode, for the side-by-side line."""
    one_layer = N * per_layer_token
    act = (N * L * h * R + one_layer + grads) if checkpointing else (L * one_layer + grads)
    return act + N * 3 * h * R


def plan_inference(shape: ModelShape, *, quant: str = "nf4", context: int = 4096, compute: str = "bf16",
                   batch: int = 1, kv_bytes: int | None = None) -> list[Part]:
    """Weights + KV cache + the prefill workspace of generating with `batch` sequences of `context` tokens."""
    b = 4 if compute == "fp32" else 2
    kvb = kv_bytes or b
    s = shape
    base = s.layers * sum(quantized_linear_bytes(a * o, o, quant, b) for _, a, o in s.linears())
    kv_cache = 2 * s.layers * s.kv_heads * s.head_dim * context * kvb * batch
    prefill = batch * context * (2 * s.hidden + s.q_dim + 2 * s.kv_dim + 2 * s.intermediate) * b + batch * s.vocab * 4
    return [Part("weights", base + s.other_params * b, f"{quant} linear layers, {compute} embeddings/head/norms"),
            Part("KV cache", kv_cache, f"2 x {s.layers} layers x {s.kv_heads} KV heads x {s.head_dim} x {context} tokens x {kvb} bytes"
                                       + (f" x {batch}" if batch > 1 else "")),
            Part("prefill workspace", prefill, "one layer's activations over the prompt + last-token logits")]


def gpu_budget(total_bytes: int) -> int:
    """Bytes of a GPU of `total_bytes` that torch tensors can use: minus the CUDA context and allocator slack."""
    return int((total_bytes - CUDA_CONTEXT) / (1 + ALLOCATOR_SLACK))


def largest_batch(shape: ModelShape, budget: int, *, context: int, max_sequences: int = 4096, **kwargs) -> TrainingPlan | None:
    """The plan with the most sequences of `context` tokens whose total fits `budget` bytes, or None."""
    fits = lambda n: plan_training(shape, context=context, batch_tokens=n * context, **kwargs)  # noqa: E731
    if fits(1).total > budget:
        return None
    lo, hi = 1, 2
    while hi <= max_sequences and fits(hi).total <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, max_sequences + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid).total <= budget else (lo, mid)
    return fits(lo)


def format_bytes(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def render(plan: TrainingPlan, inference: list[Part], *, gpu_bytes: int | None = None, best: TrainingPlan | None = None) -> str:
    """The table `distill plan` prints."""
    s, st = plan.shape, plan.settings
    lines = [f"{s.model_type}: {s.params / 1e6:,.0f}M parameters, {s.layers} layers, hidden {s.hidden}, "
             f"{s.heads}/{s.kv_heads} heads x {s.head_dim}, vocab {s.vocab:,}",
             f"training step: {st['quant']} base, LoRA r={st['lora_r']}, {st['sequences']} x {st['context']} tokens "
             f"({st['batch_tokens']:,}), {st['optimizer']}, {st['compute']}, gradient checkpointing "
             f"{'on' if st['gradient_checkpointing'] else 'off'}"]
    for p in plan.parts:
        lines.append(f"  {p.name:<38} {format_bytes(p.bytes):>11}   {p.note}")
    lines.append(f"  {'total':<38} {format_bytes(plan.total):>11}")
    lines.append(f"inference ({st['quant']}, one sequence of {st['context']} tokens):")
    for p in inference:
        lines.append(f"  {p.name:<38} {format_bytes(p.bytes):>11}   {p.note}")
    lines.append(f"  {'total':<38} {format_bytes(sum(p.bytes for p in inference)):>11}")
    if gpu_bytes is not None:
        budget = gpu_budget(gpu_bytes)
        head = f"GPU {format_bytes(gpu_bytes)}: {format_bytes(budget)} for tensors after the CUDA context and {ALLOCATOR_SLACK:.0%} allocator slack"
        if best is None:
            lines.append(f"{head}; one sequence of {st['context']} tokens does NOT fit "
                         "(lower --context, turn on gradient checkpointing, or use a smaller student)")
        else:
            lines.append(f"{head}; largest batch: {best.settings['sequences']} x {st['context']} = "
                         f"{best.settings['batch_tokens']:,} tokens ({format_bytes(best.total)})")
    return "\n".join(lines)
