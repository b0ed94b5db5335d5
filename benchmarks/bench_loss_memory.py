"""Peak memory of the chunked KD loss vs a full-logit KD loss (forward + backward), side by side.

Default shape: V = 262,144 (Gemma-3 vocabulary), 2,048 trained rows, H = 640 (Gemma-3-270M width),
k = 32 cached teacher tokens, forward KL + tail + CE. Both variants run the same loss code
(`distill.losses._chunk_terms`); the full-logit variant calls it once on all rows without
checkpointing (what a loss that builds [B*T, V] logits does), the chunked one goes through
`distillation_loss_sums` (chunks of rows under checkpointing). Target: ratio <= 1/4.

Measuring: on CUDA, torch.cuda.max_memory_allocated after a reset, minus what was allocated when the
inputs were built. On the CPU, each variant runs in a fresh subprocess; the peak resident set size
(VmHWM, reset through /proc/self/clear_refs after the inputs are built; ru_maxrss as fallback)
minus the resident size at that moment. Parameter gradients (the head's weight gradient, V x H)
count in both.

    python benchmarks/bench_loss_memory.py [--rows 2048 --vocab 262144 --hidden 640 --k 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bench_loss_memory"
QUICK_ARGS = ["--rows", "2048", "--vocab", "32768", "--hidden", "128", "--k", "8", "--chunk", "256"]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_variant(variant: str, rows: int, vocab: int, hidden: int, k: int, chunk: int | None, device: str) -> dict:
    """Build inputs, run one forward+backward of `variant`, return its peak extra memory in MiB."""
    import torch

    from distill import losses

    torch.manual_seed(0)
    dev = torch.device(device)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=dev)
    h = torch.randn(rows, hidden, device=dev, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), device=dev)
    ids = torch.randint(0, vocab, (rows, k), device=dev)
    lp = torch.log_softmax(torch.randn(rows, k + 1, device=dev), -1)[:, :k].sort(-1, descending=True).values
    cfg = losses.KDLossConfig(vocab_size=vocab, chunk_size=chunk, ce_weight=1.0)
    # Preallocate the weight gradient so both variants are charged the same for it
    head.weight.grad = torch.zeros_like(head.weight)
    h.grad = torch.zeros_like(h)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kib("VmRSS") * 1024
        hwm_reset = _reset_peak()
    t0 = time.perf_counter()
    if variant == "full":
        kd, ce = losses._chunk_terms(head, cfg, h, targets, ids, lp, None)
        loss = (kd + ce) / rows
    else:
        sums = losses.distillation_loss_sums(h, head, targets, ids, lp, cfg)
        loss = losses.combine_loss(sums, sums.n_tokens, cfg)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        method = "torch.cuda.max_memory_allocated"
    else:
        if hwm_reset:
            peak = _rss_kib("VmHWM") * 1024
            method = "VmHWM after clear_refs minus VmRSS at start"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            method = "ru_maxrss minus VmRSS at start"
    seconds = time.perf_counter() - t0
    return {
        "variant": variant,
        "peak_extra_mib": round((peak - base) / 2**20, 1),
        "seconds": round(seconds, 2),
        "loss": float(loss),
        "rows_per_chunk": cfg.rows_per_chunk(vocab) if variant == "chunked" else rows,
        "method": method,
    }


def _in_subprocess(args, variant: str) -> dict:
    cmd = [
        sys.executable, __file__, "--child", variant, "--rows", str(args.rows), "--vocab", str(args.vocab),
        "--hidden", str(args.hidden), "--k", str(args.k), "--device", args.device,
    ]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=262_144)
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--chunk", type=int, default=None, help="rows per chunk (default: the loss's auto size)")
    p.add_argument("--device", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        res = run_variant(args.child, args.rows, args.vocab, args.hidden, args.k, args.chunk, args.device)
        print(json.dumps(res))
        return res

    results = {v: _in_subprocess(args, v) for v in ("full", "chunked")}
    ratio = results["chunked"]["peak_extra_mib"] / max(results["full"]["peak_extra_mib"], 1e-9)
    report = {
        "benchmark": NAME,
        "device": args.device,
        "rows": args.rows,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "k": args.k,
        "full_logits_fp32_mib": round(args.rows * args.vocab * 4 / 2**20, 1),
        "full": results["full"],
        "chunked": results["chunked"],
        "memory_ratio_chunked_over_full": round(ratio, 4),
        "time_ratio_chunked_over_full": round(results["chunked"]["seconds"] / max(results["full"]["seconds"], 1e-9), 3),
        "loss_abs_diff": abs(results["chunked"]["loss"] - results["full"]["loss"]),
        "target_ratio": 0.25,
        "meets_target": ratio <= 0.25,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"peak extra memory: full {results['full']['peak_extra_mib']:.0f} MiB, chunked "
        f"{results['chunked']['peak_extra_mib']:.0f} MiB -> ratio {ratio:.3f} (target <= 0.25); "
        f"time ratio {report['time_ratio_chunked_over_full']:.2f}; |loss diff| {report['loss_abs_diff']:.2e}"
    )
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
