"""Gradient checkpointing policies of the student: step time and peak memory of none / all / every:N / lean.

The student is the demo's: SmolLM2-135M-Instruct cut to every second layer (15 of 30), NF4 (double
quant) + LoRA r=16 on every linear layer, trained with our offline KD step (chunked top-k KD loss on
a teacher top-k 'cache' computed here). Target for the default policy: peak memory within 1.2x of
checkpointing every layer, step time within 10% of no checkpointing.

Time: one student, the policy switched between steps (which layers recompute is a per-layer flag),
steps of the policies interleaved over `--steps` rounds after a warmup, median process CPU time
(single-threaded: on a shared machine the wall clock mostly measures the other tenants). Memory: each
policy in a fresh subprocess (loads the student, runs `--mem-steps` steps), peak resident set size
(VmHWM) in total and above the RSS before the first step; torch.cuda.max_memory_allocated on a GPU.
Activations: the bytes of the distinct tensors autograd keeps for the backward pass of one step
(a saved-tensor hook around the step; deterministic, unlike the RSS). `--breakdown`: where those
bytes go in one decoder layer without checkpointing, per token, by module.

    python benchmarks/bench_checkpointing.py [--batch 4 --seq 256 --steps 3 --lora-dropout 0
                                              --policies none,all,every:2,every:3,lean,lean+every:3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)
RESULTS = HERE / "results"
NAME = "bench_checkpointing"
QUICK_ARGS = ["--seq", "64", "--batch", "1", "--steps", "1", "--mem-steps", "1", "--policies", "none,all,every:2,lean"]


def prepare(workdir: Path, seq: int, batch: int, n_batches: int, k: int, model_dir: Path | None) -> dict:
    """The teacher's top-k targets (bench_kd_step.prepare) and the half-depth student directory."""
    import bench_kd_step

    from students.init_student import init_student

    info = bench_kd_step.prepare(workdir, seq, batch, n_batches, k, model_dir)
    student = workdir / "student"
    if not (student / "config.json").exists():
        init_student(info["model_dir"], student, keep_layers="every:2", overwrite=True)
    info["student_dir"] = str(student)
    return info


def load(student_dir: str, policy: str, device, dropout: float = 0.0):
    from students.model import LoraSettings, StudentSpec, load_student

    spec = StudentSpec(student_dir, quant="nf4", lora=LoraSettings(r=16, alpha=32, dropout=dropout),
                       gradient_checkpointing=policy != "none", checkpoint_layers="all" if policy == "none" else policy)
    model, _ = load_student(spec, device=device)
    model.train()
    return model


def every(policy: str) -> tuple[int, bool]:
    """A policy as (layer stride, lean): none = (0, False), all = (1, False), every:N = (N, False),
    lean+every:N = (N, True) (`students.model.checkpoint_policy`)."""
    from students.model import checkpoint_policy

    return (0, False) if policy == "none" else checkpoint_policy(policy)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while `fn()` runs."""
    import torch

    kept: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


def breakdown(model, batch: dict, layer: int = 3) -> dict:
    """Per token, the fp32-sized values one decoder layer keeps for the backward, by module (no
    checkpointing): what selective recomputation can target."""
    import collections
    import re

    import torch

    from distill.models.head import model_hidden_and_head

    stack: list[str] = []
    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)))
        handles.append(m.register_forward_hook(lambda m, a, o: None if stack.pop() else None))
    seen, per = set(), collections.Counter()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        m = re.search(rf"layers\.{layer}\.(.*)", stack[-1] if stack else "")
        if m and ptr not in seen:
            seen.add(ptr)
            per[re.sub(r"\.default$", "", m.group(1))] += t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden, _ = model_hidden_and_head(model, batch)
    finally:
        for h in handles:
            h.remove()
    del hidden
    tokens = batch["input_ids"].numel()
    rows = {k: round(v / tokens / 4) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v / tokens / 4 >= 1}
    return {"layer": layer, "fp32_values_per_token": sum(rows.values()), "by_module": rows}


def child_memory(policy: str, info: dict, n_steps: int, device: str, dropout: float = 0.0) -> dict:
    import torch
    from safetensors.torch import load_file

    import bench_kd_step

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = load(info["student_dir"], policy, dev, dropout)
    cache = load_file(info["cache"])
    step = bench_kd_step.make_steps(model, None, info["vocab_size"], 1.0, 0.0)["offline_kd"]
    before = bench_kd_step._status_kib("VmRSS")
    for i in range(n_steps):
        step(bench_kd_step._batch(cache, i, dev))
    res = {"policy": policy, "peak_rss_mib": round(bench_kd_step._status_kib("VmHWM") / 1024, 1),
           "rss_before_steps_mib": round(before / 1024, 1),
           "peak_rss_above_loaded_mib": round((bench_kd_step._status_kib("VmHWM") - before) / 1024, 1)}
    if dev.type == "cuda":
        res["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return res


def _start(cmd: list, env: dict, wait: bool):
    """Run `cmd` now (wait) or in the background; returns a function giving its stdout when it is done."""
    if wait:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout
        return lambda: out
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)

    def result() -> str:
        out, _ = proc.communicate()
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        return out

    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed rounds per policy (after one warmup)")
    ap.add_argument("--mem-steps", type=int, default=2, help="steps of each memory process (0: no peak-memory runs)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--policies", default="none,all,every:2,every:3,lean,lean+every:3,lean+every:2")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (the demo: 0; distill train: 0.05)")
    ap.add_argument("--breakdown", action="store_true", help="also: where one layer's saved activations go")
    ap.add_argument("--parallel", action="store_true", help="run the memory processes while timing (their peak RSS "
                    "is their own; the timing's CPU time shares the cores with them)")
    ap.add_argument("--model-dir", type=Path, default=None, help="a plain SmolLM2 directory (default: import the GGUF)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-info", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if args.threads and torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    if args.child:
        res = child_memory(args.child, json.loads(args.child_info), args.steps, args.device, args.lora_dropout)
        print(json.dumps(res))
        return res

    import bench_kd_step
    from safetensors.torch import load_file

    from students.model import set_checkpointing

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        every(p)
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_checkpointing_") as tmp:
        info = prepare(Path(tmp), args.seq, args.batch, args.steps + 1, args.k, args.model_dir)
        cache = load_file(info["cache"])
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        children = []  # the memory runs, one fresh process per policy: concurrently with the timing (--parallel)
        for p in (policies if args.mem_steps else []):
            cmd = [sys.executable, __file__, "--child", p, "--child-info", json.dumps(info), "--device", args.device,
                   "--threads", str(args.threads), "--steps", str(args.mem_steps), "--lora-dropout", str(args.lora_dropout)]
            children.append(_start(cmd, env, wait=not args.parallel))
        # "lean+all" installs both the layer recompute function and the lean wrappers on every layer
        model = load(info["student_dir"], "lean+all", dev, args.lora_dropout)
        step = bench_kd_step.make_steps(model, None, info["vocab_size"], 1.0, 0.0)["offline_kd"]
        layers = None
        if args.breakdown:
            set_checkpointing(model, 0, False)
            layers = breakdown(model, bench_kd_step._batch(cache, 0, dev))

        def run(policy: str, i: int) -> tuple[float, float]:
            set_checkpointing(model, *every(policy))
            b = bench_kd_step._batch(cache, i, dev)
            c0, t0 = time.process_time(), time.perf_counter()
            step(b)
            bench_kd_step._sync(dev)
            return time.perf_counter() - t0, time.process_time() - c0

        saved = {}
        for p in policies:
            set_checkpointing(model, *every(p))
            saved[p] = saved_bytes(lambda: step(bench_kd_step._batch(cache, 0, dev)))  # also the warmup
        wall: dict[str, list[float]] = {p: [] for p in policies}
        cpu: dict[str, list[float]] = {p: [] for p in policies}
        for r in range(args.steps):
            for p in (policies if r % 2 == 0 else policies[::-1]):
                w, c = run(p, r + 1)
                wall[p].append(w)
                cpu[p].append(c)
        del model, step
        memory = {p: json.loads(out.strip().splitlines()[-1]) for p, out in zip(policies, [c() for c in children])}
        memory = {p: memory.get(p, {}) for p in policies}  # --mem-steps 0: no memory processes

    cuda = dev.type == "cuda"
    med = {p: statistics.median(wall[p] if cuda else cpu[p]) for p in policies}
    mem_key = "cuda_peak_mib" if cuda else "peak_rss_mib"
    tokens = args.batch * args.seq
    rows = {}
    for p in policies:
        rows[p] = {
            "median_s": round(med[p], 3), "tokens_per_s": round(tokens / med[p], 1),
            "wall_s": [round(x, 3) for x in wall[p]], "cpu_s": [round(x, 3) for x in cpu[p]],
            "peak_mib": memory[p].get(mem_key), "peak_above_loaded_mib": memory[p].get("peak_rss_above_loaded_mib"),
            "saved_activations_mib": round(saved[p] / 2**20, 1),
        }
        if "none" in med:
            rows[p]["time_vs_none"] = round(med[p] / med["none"], 3)
        if "all" in memory and memory["all"].get(mem_key):
            rows[p]["memory_vs_all"] = round(memory[p][mem_key] / memory["all"][mem_key], 3)
        if "none" in saved:
            rows[p]["activations_vs_none"] = round(saved[p] / saved["none"], 3)
    report = {
        "benchmark": NAME, "device": args.device, "threads": torch.get_num_threads(),
        "clock": "wall time (CUDA)" if cuda else "process CPU time, single-threaded, policies interleaved",
        "student": "SmolLM2-135M-Instruct, every second layer (15/30), NF4 + LoRA r=16 all-linear, offline KD step",
        "batch": args.batch, "seq": args.seq, "k": args.k, "lora_dropout": args.lora_dropout, "policies": rows,
    }
    if layers:
        report["breakdown"] = layers
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{NAME}: " + "; ".join(
        f"{p}: {r['tokens_per_s']} tok/s (x{r.get('time_vs_none', '?')} time of none), peak {r['peak_mib']} MiB "
        f"(x{r.get('memory_vs_all', '?')} of all), activations {r['saved_activations_mib']} MiB" for p, r in rows.items()))
    return report


if __name__ == "__main__":
    main()
