"""On-policy distillation vs offline KD at equal teacher tokens scored, on the demo pair.

Teacher: SmolLM2-135M-Instruct (the packaged GGUF). Student: every second of its layers, NF4 + LoRA
r=16, as in `distill demo`. Both arms start from the same warm start W (offline KD on teacher traces
of `--warm` problems) and spend the same teacher budget on `--extra` further problems, one sequence
each, up to `--max-new-tokens`:

    offline    the teacher writes traces on them, caches its top-32 on its traces, W trains on that cache
    on-policy  W samples on them, the teacher caches its top-32 on W's samples, W trains on that cache

with the same optimizer steps. Measured on held-out problems (the benchmark's synthetic seed), for
W and both arms:

    KL on teacher traces   forward KL(teacher || student) on the teacher's own held-out traces
    KL on own samples      the same on the student's own held-out samples (T=1), teacher-scored
    accuracy               of those samples (pass@1 at T=1), with Wilson 95% intervals

Writes results.json and prints a Markdown table. Sized for ~30 min under `nice -n 10` on a shared
2-core CPU with the defaults; run with OMP_NUM_THREADS=1 on a busy machine.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/bench_onpolicy.py --out /tmp/onpolicy-bench
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAIN = dict(quant="nf4", lora_r=16, lora_alpha=32, lora_dropout=0.0, gradient_checkpointing=False, lr=1e-3,
             batch_size=4, warmup_steps=2, eval_every=0, eval_fraction=0.1, save_every=0, resume=True, progress=False)
CACHE = dict(top_k=32, temperature=1.0, max_length=320, dtype="fp16", progress=False)


def _problems_file(path: Path, problems: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return path


def _cpu() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--warm", type=int, default=16)
    ap.add_argument("--extra", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--warm-steps", type=int, default=24)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()

    from distill.bench.stats import wilson_interval
    from distill.bench.tasks import SYNTHETIC_SEED
    from distill.data.problems import load_problems
    from distill.pipeline.onpolicy import student_backend
    from students.init_student import init_student
    from students.train import TrainConfig, train
    from teachers.cache_build import build_cache
    from teachers.filter import filter_traces
    from teachers.generate import generate_traces, read_traces
    from teachers.gguf_import import import_gguf, smollm2_gguf_path

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), _cpu()
    log = lambda m: print(f"[{time.perf_counter() - t0:7.0f}s] {m}", flush=True)  # noqa: E731
    teacher = out / "teacher"
    if not (teacher / "config.json").is_file():
        import_gguf(smollm2_gguf_path(), teacher)
    student = out / "student-init"
    if not (student / "config.json").is_file():
        init_student(str(teacher), student, keep_layers="every:2", overwrite=True)
    train_problems = load_problems(f"synthetic:{args.warm + args.extra}:0")
    warm = _problems_file(out / "warm.jsonl", train_problems[:args.warm])
    extra = _problems_file(out / "extra.jsonl", train_problems[args.warm:])
    heldout = _problems_file(out / "heldout.jsonl", load_problems(f"synthetic:{args.heldout}:{SYNTHETIC_SEED}"))
    gen = dict(samples=1, max_new_tokens=args.max_new_tokens, batch_size=16, progress=False)

    def teacher_traces(data: Path, name: str, temperature: float = 0.7) -> Path:
        generate_traces(teacher=str(teacher), data=str(data), out=out / f"{name}-traces.jsonl", temperature=temperature, **gen)
        return _cache_on(out / f"{name}-traces.jsonl", name)

    def student_samples(adapter: Path, data: Path, name: str) -> Path:
        backend = student_backend(adapter, quant="nf4")
        generate_traces(backend=backend, teacher=str(adapter), data=str(data), out=out / f"{name}-traces.jsonl",
                        temperature=1.0, top_p=1.0, seed=1, **gen)
        del backend
        gc.collect()
        return _cache_on(out / f"{name}-traces.jsonl", name)

    def _cache_on(traces: Path, name: str) -> Path:
        filter_traces(traces, out / f"{name}-records.jsonl", keep="all", require_format=False, echo=None)
        build_cache(str(teacher), out / f"{name}-records.jsonl", out / f"{name}-cache", log=lambda m: None, **CACHE)
        return out / f"{name}-cache"

    def train_on(cache: Path, name: str, steps: int, init: Path | None) -> Path:
        train(TrainConfig(student=str(student), cache=str(cache), out=out / name, steps=steps,
                          init_adapter=str(init) if init else None, **TRAIN))
        gc.collect()
        return out / name / "final"

    log("warm start: teacher traces, cache, KD")
    warm_adapter = train_on(teacher_traces(warm, "warm"), "W", args.warm_steps, None)
    log("offline arm: teacher traces on the extra problems")
    offline_cache = teacher_traces(extra, "offline")
    offline = train_on(offline_cache, "offline", args.steps, warm_adapter)
    log("on-policy arm: the warm student's samples on the extra problems")
    onpolicy_cache = student_samples(warm_adapter, extra, "onpolicy")
    onpolicy = train_on(onpolicy_cache, "onpolicy-train", args.steps, warm_adapter)

    log("held-out: teacher traces")
    heldout_teacher = teacher_traces(heldout, "heldout-teacher")
    teacher_acc = _accuracy(read_traces(out / "heldout-teacher-traces.jsonl"))
    rows = {}
    for name, adapter in (("warm start W", warm_adapter), ("offline KD", offline), ("on-policy", onpolicy)):
        log(f"held-out: {name}")
        own_cache = student_samples(adapter, heldout, f"heldout-own-{adapter.parent.name}")
        hits, n = _accuracy(read_traces(out / f"heldout-own-{adapter.parent.name}-traces.jsonl"))
        rows[name] = {"kl_teacher_traces": _kl(student, adapter, heldout_teacher),
                      "kl_own_samples": _kl(student, adapter, own_cache),
                      "accuracy": hits / n, "accuracy_ci95": wilson_interval(hits, n), "n": n}
    budget = {name: _tokens(cache) for name, cache in (("offline", offline_cache), ("on-policy", onpolicy_cache))}
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "teacher_tokens_scored": budget,
               "teacher_heldout_accuracy": teacher_acc[0] / teacher_acc[1], "rows": rows,
               "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(_cpu() - c0, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nteacher positions scored: offline {budget['offline']}, on-policy {budget['on-policy']}; "
          f"teacher held-out accuracy {results['teacher_heldout_accuracy']:.1%}")
    print("| student | KL on teacher traces | KL on own samples | accuracy (T=1) [95% CI] |")
    print("|---|---:|---:|---|")
    for name, r in rows.items():
        lo, hi = r["accuracy_ci95"]
        print(f"| {name} | {r['kl_teacher_traces']:.4f} | {r['kl_own_samples']:.4f} | "
              f"{r['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] (n={r['n']}) |")
    print(f"wall {results['wall_s']:.0f}s, cpu {results['cpu_s']:.0f}s")


def _accuracy(traces: list[dict]) -> tuple[int, int]:
    from teachers.verify import is_correct

    return sum(is_correct(t["completion"], t["gold"]) for t in traces), len(traces)


def _tokens(cache: Path) -> dict:
    from distill.cache.format import read_manifest

    m = read_manifest(cache)
    return {"sequences": m.num_samples, "tokens": m.num_tokens, "positions": sum(s.num_rows for s in m.shards)}


def _kl(student: Path, adapter: Path, cache: Path) -> float:
    from distill.bench.agreement import agreement_with_teacher
    from students.model import LoraSettings, StudentSpec, load_student

    model, tok = load_student(StudentSpec(path=str(student), quant="nf4", lora=LoraSettings(r=16, alpha=32, dropout=0.0),
                                          gradient_checkpointing=False), device="cpu", adapter_dir=adapter, trainable=False)
    kl = agreement_with_teacher(model, tok, str(cache), batch_size=4)["kl"]
    del model
    gc.collect()
    return kl


if __name__ == "__main__":
    main()
