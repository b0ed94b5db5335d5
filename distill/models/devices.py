"""Where a model runs and in which float type: one answer for teachers, students and the benchmark.

bf16 on a GPU (half the memory of fp32, tensor cores) and fp32 on the CPU, where bf16 matmuls are
slow and lossy. A CPU without bf16 (fp16) instructions (AVX512-BF16 / AMX on x86, the BF16 extension
on Arm) emulates them: measured about 3x slower than fp32 on an AVX2-only EPYC. `cpu_compute_dtype`
turns such a request into fp32 (storage dtypes, e.g. of an export or a cache, are not affected).
torch is imported inside the functions so that importing `distill.models` (done by the CLI and the
data loaders) stays cheap.
"""

from __future__ import annotations

import functools
import platform
import sys

from distill.errors import DistillError

# /proc/cpuinfo flags that mean the CPU computes in the half type natively.
_NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16", "bf16"), "fp16": ("avx512_fp16", "amx_fp16", "fphp")}

DTYPE_NAMES = ("bf16", "fp16", "fp32")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def default_device():
    """The current CUDA device when there is one, else the CPU (a torch.device)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device=None):
    """`device` (None, a string or a torch.device) as a torch.device; a GPU asked for on a machine
    without one is a one-line error here rather than a CUDA trace from deep inside a load."""
    import torch

    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DistillError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DistillError(f"device {str(device)!r} asked for but no CUDA GPU is available; use --device cpu")
    return dev


def compute_dtype(device=None):
    """bf16 on a GPU, fp32 on the CPU."""
    import torch

    device = torch.device(device) if device is not None else default_device()
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(dtype, *, device=None, flag: str = "dtype"):
    """A torch dtype from None (the device's compute dtype), 'bf16' | 'fp16' | 'fp32', 'auto' (kept:
    transformers then uses the checkpoint's own dtype) or a torch.dtype."""
    import torch

    if dtype is None:
        return compute_dtype(device)
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in names:
        raise DistillError(f"{flag} must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return names[dtype]


def device_map_memory(device_map, local_rank: int = 0, local_world: int = 1) -> dict | None:
    """`max_memory` for a `device_map` load by one of `local_world` processes on this machine, or None.

    None (accelerate's own budget: every GPU, then the CPU) for a single process or without a device
    map. With several processes each may fill only its own block of GPUs (`distill.ranks.
    gpus_for_local_rank`) and its share of the host memory, so two processes never share a GPU.
    """
    if device_map is None or local_world <= 1:
        return None
    import torch
    from accelerate.utils import get_max_memory

    from distill.ranks import gpus_for_local_rank

    budget = get_max_memory()
    mine = gpus_for_local_rank(local_rank, local_world, torch.cuda.device_count())
    memory: dict = {i: budget[i] for i in mine if i in budget}
    if "cpu" in budget:
        memory["cpu"] = int(budget["cpu"] // local_world)
    return memory
@functools.lru_cache(maxsize=None)
def cpu_native_half(kind: str = "bf16", cpuinfo: str | None = None) -> bool:
    """Whether this CPU has instructions for `kind` ("bf16" | "fp16") arithmetic.

    Read from the kernel's CPU flags (/proc/cpuinfo, or `cpuinfo` text in tests); Apple silicon has
    both. Where it cannot be told, False: fp32 is then chosen, which is never the slow choice.
    """
    if cpuinfo is None:
        if sys.platform == "darwin":
            return platform.machine() == "arm64"
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return any(f in flags for f in _NATIVE_FLAGS[kind])


def cpu_compute_dtype(dtype, device=None, *, warn: bool = True):
    """`dtype` for computing on `device`: bf16 / fp16 become fp32 on a CPU that would emulate them.

    Call it where a model is loaded to compute, not where a dtype only decides how tensors are stored.
    `warn` prints one line to stderr when an explicit request is overridden.
    """
    import torch

    device = torch.device(device) if device is not None else default_device()
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return dtype
    kind = "bf16" if dtype == torch.bfloat16 else "fp16"
    if cpu_native_half(kind):
        return dtype
    if warn:
        _warn_once(f"note: this CPU has no {kind} instructions ({kind} would be emulated, ~3x slower); computing in fp32")
    return torch.float32


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    print(message, file=sys.stderr)
