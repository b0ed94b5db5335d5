"""Build a student: any Hugging Face causal LM as NF4 / int8 / unquantized base plus LoRA adapters.

QLoRA recipe (docs/training.md): NF4 base weights with double quantization, bf16 compute on a GPU
(fp32 on the CPU, where bitsandbytes' kernels and autograd are happiest), the norms and embeddings kept
in fp32 (`prepare_model_for_kbit_training`), LoRA on every linear layer except the output head, and
gradient checkpointing. bitsandbytes 0.50 runs NF4 and int8 layers on the CPU, so the whole path is
testable without a GPU.

The base model and tokenizer load through `distill.models` (one loader for every model); this module
adds what makes it a trainable student: k-bit preparation, LoRA adapters, saved adapter weights.
`trust_remote_code` is off unless the caller turns it on: a model directory must not run code.
Gradient checkpointing is selective by default (`DEFAULT_CHECKPOINT_LAYERS` = "lean",
students/recompute.py): no layer is recomputed whole, each recomputes its cheap elementwise
activations; measured at 4 x 256 tokens, no measurable time over none, peak memory 1.09x of
checkpointing every layer (benchmarks/README.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill.errors import DistillError
from distill.models.loading import one_line
from distill.models.quant import check_quant


@dataclass
class LoraSettings:
    """LoRA hyper-parameters. `target_modules=None` means every linear layer except the LM head."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StudentSpec:
    """Everything needed to rebuild the same student (recorded in run.json)."""

    path: str
    quant: str = "nf4"
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False
    checkpoint_layers: str = "lean"  # what recomputes when checkpointing: all | every:N | lean | lean+every:N

    def __post_init__(self):
        checkpoint_every(self.checkpoint_layers)  # a bad value fails before any load

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StudentSpec":
        d = dict(d)
        d["lora"] = LoraSettings(**d.get("lora", {}))
        return cls(**d)


# Which decoder layers recompute by default when gradient checkpointing is on. Measured on the demo's
# student (SmolLM2-135M half depth, NF4 + LoRA r=16, 4 x 160 tokens, CPU, benchmarks/
# bench_checkpointing.py; step time vs none / peak RSS vs all): none 1.00 / 1.19, every:3 1.05 / 1.16,
# every:2 1.12 / 1.07, all 1.25 / 1.00.
DEFAULT_CHECKPOINT_LAYERS = "lean"
CHECKPOINT_LAYERS_HELP = ("all | every:N | lean | lean+every:N (every N-th decoder layer recomputes whole in the backward "
                          "pass; lean: the others recompute their cheap elementwise activations instead of storing them)")


def checkpoint_policy(value: str) -> tuple[int, bool]:
    """`--checkpoint-layers` as (layer stride, lean): stride 1 = every layer recomputes whole, N = every
    N-th, 0 = none; lean = the layers not recomputed whole keep only their expensive activations
    (`students.recompute`). "all" = (1, False), "every:N" = (N, False), "lean" = (0, True),
    "lean+every:N" = (N, True)."""
    parts = value.split("+") if isinstance(value, str) else []
    lean = parts.count("lean") == 1
    rest = [p for p in parts if p != "lean"]
    every = 0 if (lean and not rest) else None
    if len(rest) == 1 and len(parts) == len(rest) + lean:
        if rest[0] == "all":
            every = 1
        elif rest[0].startswith("every:"):
            try:
                every = max(0, int(rest[0].split(":", 1)[1])) or None
            except ValueError:
                every = None
    if every is None:
        raise DistillError(f"--checkpoint-layers {value!r} is not one of: {CHECKPOINT_LAYERS_HELP}")
    return every, lean


def checkpoint_every(value: str) -> int:
    """`--checkpoint-layers` as a layer stride: 1 = every layer, N = every N-th, 0 = none (lean alone)."""
    return checkpoint_policy(value)[0]


def set_checkpointing(model, every: int, lean: bool = False) -> int:
    """Recompute every `every`-th decoder layer (0: none) in the backward pass; returns how many do.
    `lean`: the other layers recompute their cheap activations (`students.recompute.make_lean`).

    The model's gradient checkpointing must have been enabled (it installs the recompute function on
    every layer); this sets, layer by layer, which ones use it. Checkpointing a layer saves its
    activations (about 20 hidden-sized vectors per token for a LoRA'd decoder layer) at the price of a
    second forward through it, so every:N keeps about 1/N of the memory saving of "all" for 1/N of
    its time cost. transformers versions whose layers carry no per-layer flag (before
    GradientCheckpointingLayer) checkpoint every layer or none.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers: all or nothing
        return -1
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    chosen = 0
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = every > 0 and i % every == 0
        chosen += layer.gradient_checkpointing
    if lean or any(hasattr(layer, "_distill_lean") for layer in layers):
        from students.recompute import make_lean

        make_lean(model, on=lean)
    return chosen


def _disable_cpu_inference_packing(model) -> None:
    """Keep bitsandbytes' NF4 layers in their training layout on the CPU.

    In eval mode without grad, bnb 0.50 repacks a CPU Linear4bit's weight in place into an AVX512
    inference layout (and fails for rows shorter than one quantization block). A student alternates
    training and held-out evaluation, so the repacking would make eval and train use different
    kernels, and the layout change is not something a resumed run would replay. Off for students.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    targets = settings.target_modules if settings.target_modules else "all-linear"
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_student(spec: StudentSpec, *, device=None, adapter_dir: str | Path | None = None, trainable: bool = True,
                 quant_storage=None):
    """Base model + LoRA adapters, ready to train. Returns (model, tokenizer).

    `adapter_dir` loads saved adapter weights (resume, evaluation) into the freshly built adapters;
    LoRA settings must match the ones the adapters were trained with (run.json records them).
    `quant_storage` (a float dtype): a student that FSDP / DeepSpeed will shard. Its NF4 weights are
    stored in that dtype and its norms and embeddings are kept in it too, not upcast to fp32 as k-bit
    preparation does: those engines need one float dtype per sharded unit.
    """
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    from distill.models import load_model, load_tokenizer

    check_quant(spec.quant)
    if spec.lora.r < 1:
        raise DistillError(f"--lora-r must be at least 1, got {spec.lora.r}")
    tokenizer = load_tokenizer(spec.path, what="student", trust_remote_code=spec.trust_remote_code)
    model = load_model(spec.path, what="student", quant=spec.quant, device=device,
                       trust_remote_code=spec.trust_remote_code, quant_storage=quant_storage)
    model.config.use_cache = False
    _disable_cpu_inference_packing(model)
    gc_kwargs = {"use_reentrant": False}
    every, lean = checkpoint_policy(spec.checkpoint_layers) if spec.gradient_checkpointing and trainable else (0, False)
    if spec.quant != "none" and quant_storage is None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=every > 0,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if every > 0:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    if every > 1:
        set_checkpointing(model, every)
    try:
        model = get_peft_model(model, lora_config(spec.lora))
    except ValueError as err:
        raise DistillError(f"cannot attach LoRA to {spec.path}: {one_line(err)}") from None
    if lean:  # after the adapters exist: their dropout turns lean too
        from students.recompute import make_lean

        make_lean(model)
    # Adapters train in fp32 whatever the base dtype (peft's autocast_adapter_dtype does this for
    # bf16/fp16 bases; make it explicit so the optimizer state is fp32 too).
    for n, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if adapter_dir is not None:
        load_adapter_weights(model, adapter_dir)
    if not trainable:
        model.eval()
    return model, tokenizer


def load_adapter_weights(model, adapter_dir: str | Path) -> None:
    """Copy saved LoRA weights (peft `save_pretrained` layout, safetensors) into `model`'s adapters."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise DistillError(f"{adapter_dir} holds no adapter_model.safetensors; is it a checkpoint or final/ directory of a run?")
    weights = load_peft_weights(str(adapter_dir), device="cpu")
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as err:  # another LoRA rank or target set: tensors of other shapes
        raise DistillError(f"adapter in {adapter_dir} does not fit this student (other LoRA settings?): "
                           f"{one_line(err, 160)}") from None
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise DistillError(f"adapter in {adapter_dir} does not fit this student ({len(unexpected)} unexpected keys, e.g. {unexpected[0]})")


def count_parameters(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}

