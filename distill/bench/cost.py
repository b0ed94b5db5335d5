"""Cost columns of the benchmark: parameters, size on disk, quantization, peak memory, tokens/s.

Peak memory is what the model needed while it was being benchmarked, not the whole process's
lifetime peak: on CUDA `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`; on the CPU
the process's peak resident set (VmHWM), reset through /proc/self/clear_refs where Linux allows it.
Where it cannot be reset (not Linux) the figure is the lifetime peak and is labelled so.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path


def parameter_count(model) -> int:
    """Number of parameters as the model would have unquantized.

    bitsandbytes packs two 4-bit weights per uint8 element (Params4bit.numel() is half the real
    count); its quant_state keeps the original shape, which we use.
    """
    total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        qs = getattr(p, "quant_state", None)
        shape = getattr(qs, "shape", None) if qs is not None else None
        if shape is not None:
            n = 1
            for d in shape:
                n *= int(d)
            total += n
        else:
            total += p.numel()
    return total


def quantization_kind(model) -> str:
    """'nf4' / 'fp4' / 'int8' from bitsandbytes layers, else the weights' dtype (e.g. 'bf16')."""
    kinds = set()
    for m in model.modules():
        name = type(m).__name__
        if name == "Linear4bit":
            qs = getattr(m.weight, "quant_state", None)
            kinds.add(getattr(qs, "quant_type", None) or getattr(m.weight, "quant_type", "4bit"))
        elif name == "Linear8bitLt":
            kinds.add("int8")
    if kinds:
        return "+".join(sorted(kinds))
    import torch

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return "+".join(sorted(names.get(d, str(d).replace("torch.", "")) for d in dtypes)) or "unknown"


def size_on_disk(path: str | os.PathLike) -> int | None:
    """Bytes of weights a user downloads: a GGUF file, or the weight files of a model directory.

    Counts *.safetensors / *.bin / *.gguf / *.pt files (a directory's tokenizer and JSON files are a
    few MB at most and are not what differs between models). None for a hub id not on disk.
    """
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    total = 0
    for f in p.rglob("*"):
        if f.is_file() and f.suffix in {".safetensors", ".bin", ".gguf", ".pt", ".pth"}:
            total += f.stat().st_size
    return total


def _read_vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Context manager measuring peak memory of the enclosed work (see module docstring)."""

    def __init__(self, device=None):
        import torch

        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.peak_bytes: int | None = None
        self.kind = "cuda_max_allocated" if self.cuda else "process_peak_rss"

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            except OSError:
                self.kind = "process_peak_rss_lifetime"
        return self

    def sample(self) -> int | None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        hwm = _read_vm_hwm()
        if hwm is not None:
            return hwm
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)

    def __exit__(self, *exc):
        self.peak_bytes = self.sample()
        return False


class Throughput:
    """Accumulates generated tokens and wall time over several batched generation calls."""

    def __init__(self):
        self.tokens = 0
        self.seconds = 0.0

    def timed(self, fn, *args, **kwargs):
        import torch

        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return result

    def add_tokens(self, n: int) -> None:
        self.tokens += int(n)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None
