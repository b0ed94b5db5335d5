"""`distill train --batch-tokens auto`: the largest micro-batch the memory planner fits on this machine.

On CUDA the budget is the GPU's free memory less the allocator slack (distill/plan.py); on the CPU
it is half of the available RAM (MemAvailable), a documented default that leaves room for the OS,
the data loader and the page cache. The padded sequence length is the longest training sample (a
micro-batch pads to its longest sample), so the plan holds for every batch of the run.

The choice is made once and stored in run.json ("batch_plan"): a resumed run reuses it even if the
free memory changed, so that its micro-batches, and hence its losses, replay exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.errors import DistillError


def available_memory(device) -> tuple[int, str]:
    """(bytes the plan may use, how that figure was found)."""
    import torch

    from distill.plan import ALLOCATOR_SLACK, CPU_RAM_SHARE

    if torch.device(device).type == "cuda":
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(free / (1 + ALLOCATOR_SLACK)), f"CUDA free memory {free / 2**30:.1f} of {total / 2**30:.1f} GiB, less {ALLOCATOR_SLACK:.0%} allocator slack"
    avail = _mem_available()
    return int(avail * CPU_RAM_SHARE), f"{CPU_RAM_SHARE:.0%} of the {avail / 2**30:.1f} GiB of available RAM"


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def resolve_auto_batch(cfg, out: Path, lengths, *, top_k: int, device) -> dict:
    """The batch plan of a run with `--batch-tokens auto`: {"batch_tokens", "sequences", "context", ...}."""
    import torch

    from distill.plan import format_bytes, largest_batch, load_shape

    run_file = Path(out) / "run.json"
    if cfg.resume and run_file.is_file():
        try:
            previous = json.loads(run_file.read_text()).get("batch_plan")
        except ValueError:
            previous = None
        if previous:
            return previous
    cuda = torch.device(device).type == "cuda"
    optimizer = cfg.optimizer if cfg.optimizer != "auto" else ("paged-adamw-8bit" if cuda else "adamw")
    context = max(int(n) for n in lengths)
    budget, source = available_memory(device)
    shape = load_shape(cfg.student, trust_remote_code=cfg.trust_remote_code)
    from students.model import checkpoint_policy

    every, lean = checkpoint_policy(cfg.checkpoint_layers)
    setup = dict(context=context, quant=cfg.quant, lora_r=cfg.lora_r, optimizer=optimizer,
                 gradient_checkpointing=cfg.gradient_checkpointing, compute="bf16" if cuda else "fp32",
                 loss_chunk=cfg.loss_chunk_size, top_k=top_k, lora_dropout=cfg.lora_dropout, checkpoint_every=every,
                 lean=lean)
    best = largest_batch(shape, budget, max_sequences=max(1, len(lengths)), **setup)
    if best is None:
        one = largest_batch(shape, 2**62, max_sequences=1, **setup)
        raise DistillError(f"--batch-tokens auto: one sequence of {context} tokens needs {format_bytes(one.total)} but only "
                           f"{format_bytes(budget)} is available ({source}); shorten the cache's samples or turn on gradient checkpointing")
    sequences = best.settings["sequences"]
    return {"batch_tokens": sequences * context, "sequences": sequences, "context": context,
            "planned_bytes": best.total, "budget_bytes": budget, "budget": source, "device": "cuda" if cuda else "cpu",
            "message": f"--batch-tokens auto: {sequences} x {context} = {sequences * context:,} tokens per micro-batch "
                       f"(planned {format_bytes(best.total)} of {format_bytes(budget)}: {source})"}
