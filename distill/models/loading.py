"""Load a tokenizer or a model from any source `distill.models.source` resolves, as one call.

Defaults are the safe ones: `trust_remote_code=False` unless the caller asks; the device's compute
dtype (bf16 on a GPU, fp32 on the CPU); the weights placed on one device with `device_map={"": device}`
(bitsandbytes needs it, and it loads straight onto the GPU instead of through host memory); optional
NF4 / int8 quantization; a LoRA adapter put on top with peft. Whatever goes wrong becomes one
DistillError line that names the model ("teacher X does not load: ...").

torch, transformers and peft are imported inside the functions: `import distill.models` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError
from distill.models.devices import compute_dtype, cpu_compute_dtype, parse_dtype, resolve_device
from distill.models.quant import bnb_config, check_quant
from distill.models.source import resolve_source

TASKS = ("causal-lm", "sequence-classification")


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one short line (loaders raise multi-line messages)."""
    msg = " ".join(str(err).split())
    return (msg[:limit] + "...") if len(msg) > limit else (msg or type(err).__name__)


def load_tokenizer(ref, *, what: str = "model", accept=("dir", "hub"), trust_remote_code: bool = False,
                   revision: str | None = None, require_pad: bool = False):
    """The tokenizer of `ref`, with a pad token: EOS when it has none (padding is only ever masked).

    `require_pad` refuses a tokenizer that has neither (batched teacher passes need a pad id)."""
    from transformers import AutoTokenizer

    src = resolve_source(ref, what=what, accept=accept)
    kwargs: dict = {"trust_remote_code": trust_remote_code, "revision": revision}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(src.tokenizer_path, **kwargs)
    except Exception as err:  # noqa: BLE001 - any loader failure is a user-facing one-liner
        raise DistillError(f"the tokenizer of {what} {src.ref} does not load: {one_line(err)}") from None
    if tok.pad_token_id is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif require_pad:
            raise DistillError(f"the tokenizer of {what} {src.ref} has neither a pad nor an EOS token")
    return tok


def load_config(ref, *, what: str = "model", accept=("dir", "hub"), trust_remote_code: bool = False,
                revision: str | None = None):
    """The model config of `ref` alone (no weights): what the memory planner and export checks read."""
    from transformers import AutoConfig

    src = resolve_source(ref, what=what, accept=accept)
    try:
        return AutoConfig.from_pretrained(src.tokenizer_path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as err:  # noqa: BLE001 - any loader failure is a user-facing one-liner
        raise DistillError(f"the config of {what} {src.ref} does not load: {one_line(err)}") from None


def load_model(ref, *, what: str = "model", accept=("dir", "hub"), quant: str = "none", device=None, dtype=None,
               trust_remote_code: bool = False, revision: str | None = None, device_map=None,
               max_memory: dict | None = None, adapter: str | Path | None = None, trainable: bool = False,
               task: str = "causal-lm", quant_storage=None, compute: bool = True):
    """Load `ref` (a reference or a resolved ModelSource) in eval mode and return the model.

    quant: none | nf4 | int8. device: None (the default device), "cpu", "cuda", a torch.device.
    dtype: None (the device's compute dtype), "bf16" | "fp16" | "fp32", "auto" (the checkpoint's) or a
    torch.dtype. device_map: overrides the single-device placement: "auto" spreads the layers over the
    GPUs, then the CPU, with accelerate's big-model loading (a teacher larger than one GPU);
    max_memory ({gpu index or "cpu": bytes}) caps what it may use where.
    adapter: a LoRA adapter directory applied on top (an "adapter" source brings its own); trainable
    keeps its weights trainable. task: "causal-lm" or "sequence-classification" (reward models).
    quant_storage: the dtype NF4 weights are stored in (`distill.models.quant.bnb_config`).
    compute: the model will run (not only be re-saved): on a CPU that would emulate bf16 / fp16, the
    weights and the 4-bit layers' compute type are then fp32, whatever was asked or saved.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    check_quant(quant)
    src = resolve_source(ref, what=what, accept=accept)
    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype, device=dev, flag=f"{what} dtype")
    if compute and torch_dtype != "auto":
        torch_dtype = cpu_compute_dtype(torch_dtype, dev)
    base = src
    if src.kind == "adapter":
        base = resolve_source(src.base, what=f"{what} base model", accept=("dir", "hub"))
        adapter = src.path
    qcfg = bnb_config(quant, compute_dtype(dev) if torch_dtype == "auto" else torch_dtype,
                      cpu_offload=device_map is not None, quant_storage=quant_storage)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code,
                    "device_map": device_map if device_map is not None else {"": dev}}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if revision is not None and base is src:
        kwargs["revision"] = revision
    if base.gguf_file:
        kwargs["gguf_file"] = base.gguf_file
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if task == "causal-lm":
        from transformers import AutoModelForCausalLM as auto_class
    else:
        from transformers import AutoModelForSequenceClassification as auto_class
    try:
        model = auto_class.from_pretrained(base.path, **kwargs)
    except Exception as err:  # noqa: BLE001
        shown = f" ({quant})" if quant != "none" else ""
        name = src.ref if base is src else f"{src.ref} (base {base.ref})"
        raise DistillError(f"{what} {name} does not load{shown}: {one_line(err)}") from None
    if compute:
        _compute_in_fp32_where_emulated(model, dev)
    if adapter is not None:
        model = attach_adapter(model, adapter, trainable=trainable, what=f"{what} {base.ref}")
    model.eval()
    return model


def _compute_in_fp32_where_emulated(model, device) -> None:
    """A model that came in bf16 / fp16 ("auto", or the compute type a 4-bit checkpoint saved) on a
    CPU without those instructions: cast its float weights, and its 4-bit layers' compute type, to fp32."""
    import torch

    if torch.device(device).type != "cpu":
        return
    # packed 4/8-bit weights (bitsandbytes' Params4bit / Int8Params, stored in `quant_storage`) are not floats
    floats = [p for p in model.parameters() if type(p).__name__ not in ("Params4bit", "Int8Params")]
    halves = {p.dtype for p in floats if p.dtype in (torch.bfloat16, torch.float16)}
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float16):
            halves.add(dtype)
    if not any(cpu_compute_dtype(d, device) == torch.float32 for d in halves):
        return
    for module in model.modules():
        if getattr(module, "compute_dtype", None) in (torch.bfloat16, torch.float16):
            module.compute_dtype = torch.float32
    for param in floats:
        if param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    for buf_name, buf in list(model.named_buffers()):
        if buf.dtype in (torch.bfloat16, torch.float16):
            owner = model.get_submodule(buf_name.rpartition(".")[0]) if "." in buf_name else model
            setattr(owner, buf_name.rpartition(".")[2], buf.float())


def attach_adapter(model, adapter_dir: str | Path, *, trainable: bool = False, what: str = "the model"):
    """`model` wrapped in a peft PeftModel carrying the saved LoRA adapter in `adapter_dir`."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except Exception as err:  # noqa: BLE001
        raise DistillError(f"the adapter in {adapter_dir} does not load onto {what}: {one_line(err, 200)}") from None


def model_from_config(config, *, dtype=None, trust_remote_code: bool = False):
    """A freshly initialised causal LM for `config` (weights are copied in by the caller)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_config(config, **kwargs)

