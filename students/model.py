"""Load a student: any Hugging Face causal LM as NF4 / int8 / unquantized base plus LoRA adapters.

QLoRA recipe (DESIGN.md section 5): NF4 base weights with double quantization, bf16 compute on a GPU
(fp32 on the CPU, where bitsandbytes' kernels and autograd are happiest), the norms and embeddings kept
in fp32 (`prepare_model_for_kbit_training`), LoRA on every linear layer except the output head, and
gradient checkpointing. bitsandbytes 0.50 runs NF4 and int8 layers on the CPU, so the whole path is
testable without a GPU.

`trust_remote_code` is off unless the caller turns it on: a model directory must not run code.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill.errors import DistillError

QUANT_CHOICES = ("nf4", "int8", "none")


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StudentSpec":
        d = dict(d)
        d["lora"] = LoraSettings(**d.get("lora", {}))
        return cls(**d)


def default_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(device=None):
    """bf16 on a GPU (half the activation memory, tensor cores), fp32 on the CPU."""
    import torch

    device = device or default_device()
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _check_source(path: str) -> None:
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise DistillError(f"student {path} is a file, not a model directory; pass the directory that holds config.json")
        if not (p / "config.json").exists():
            raise DistillError(f"student directory {path} has no config.json; pass a Hugging Face model directory")
        return
    # Not a local path: accept it as a hub id only if it looks like one ("org/name" or "name").
    looks_like_hub_id = path.count("/") <= 1 and not path.startswith((".", "/", "~")) and path.strip() == path and path
    if not looks_like_hub_id:
        raise DistillError(f"student {path} does not exist; pass a model directory or a hub id like org/name")


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """The student's tokenizer, with a pad token (EOS when the model has none: padding is masked)."""
    from transformers import AutoTokenizer

    _check_source(str(path))
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any loader failure is a user-facing one-liner
        raise DistillError(f"cannot load the tokenizer of {path}: {_one_line(err)}") from None
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return (msg[:300] + "...") if len(msg) > 300 else (msg or type(err).__name__)


def quantization_config(quant: str, dtype):
    """The BitsAndBytesConfig for `quant` (None for "none")."""
    from transformers import BitsAndBytesConfig

    if quant == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "none":
        return None
    raise DistillError(f"unknown quantization {quant!r}; use one of {', '.join(QUANT_CHOICES)}")


def load_base(path: str, *, quant: str = "nf4", device=None, dtype=None, trust_remote_code: bool = False):
    """Load the base causal LM, quantized as asked, on `device`; raise a one-line DistillError on failure."""
    import torch
    from transformers import AutoModelForCausalLM

    path = str(path)
    _check_source(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or compute_dtype(device)
    qcfg = quantization_config(quant, dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, device_map={"": device})
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except DistillError:
        raise
    except Exception as err:  # noqa: BLE001
        raise DistillError(f"cannot load student {path} ({quant}): {_one_line(err)}") from None
    return model


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


def load_student(spec: StudentSpec, *, device=None, adapter_dir: str | Path | None = None, trainable: bool = True):
    """Base model + LoRA adapters, ready to train. Returns (model, tokenizer).

    `adapter_dir` loads saved adapter weights (resume, evaluation) into the freshly built adapters;
    LoRA settings must match the ones the adapters were trained with (run.json records them).
    """
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    if spec.quant not in QUANT_CHOICES:
        raise DistillError(f"unknown quantization {spec.quant!r}; use one of {', '.join(QUANT_CHOICES)}")
    if spec.lora.r < 1:
        raise DistillError(f"--lora-r must be at least 1, got {spec.lora.r}")
    tokenizer = load_tokenizer(spec.path, trust_remote_code=spec.trust_remote_code)
    model = load_base(spec.path, quant=spec.quant, device=device, trust_remote_code=spec.trust_remote_code)
    model.config.use_cache = False
    _disable_cpu_inference_packing(model)
    gc_kwargs = {"use_reentrant": False}
    if spec.quant != "none":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.gradient_checkpointing and trainable,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if spec.gradient_checkpointing and trainable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    try:
        model = get_peft_model(model, lora_config(spec.lora))
    except ValueError as err:
        raise DistillError(f"cannot attach LoRA to {spec.path}: {_one_line(err)}") from None
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
    result = set_peft_model_state_dict(model, weights)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise DistillError(f"adapter in {adapter_dir} does not fit this student ({len(unexpected)} unexpected keys, e.g. {unexpected[0]})")


def count_parameters(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


def is_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available() and os.environ.get("DISTILL_FORCE_CPU") != "1"
