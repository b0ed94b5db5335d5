"""On-policy distillation with a cached teacher, in rounds (GKD, Agarwal et al. 2024).

Training on the teacher's traces teaches the student states it never reaches itself. Here the student
trains on its OWN samples, scored by the teacher, without ever holding both models in memory: each
round is three passes, each with one model loaded,

    1. the student (the previous round's adapters on the NF4 base) samples `[onpolicy] samples`
       completions per training prompt                      -> onpolicy/round-R/samples.jsonl
    2. the teacher caches its top-k on those completions, plus a `mix` share of its own kept traces
                                                             -> onpolicy/round-R/records.jsonl, cache/
    3. the student trains on that cache, starting from the previous round's adapters
                                                             -> onpolicy/round-R/train/

Round 1 starts from the train stage's adapters. Every pass resumes as its stage does (sampling by
(problem, sample) rows, the cache by shards, training from its last checkpoint), and a finished round
writes `onpolicy/round-R/done.json` with the hash of the settings it was made with, so a killed run
redoes only the unfinished round. The last round's train/ is a run like any other: the export and
benchmark stages take it.
"""

from __future__ import annotations

import gc
import json
import random
from dataclasses import replace
from pathlib import Path

from distill.errors import DistillError
from distill.io import atomic_write_json, atomic_write_jsonl
from distill.pipeline.runner import RunContext


def round_dir(run_dir: Path, r: int) -> Path:
    return Path(run_dir) / "onpolicy" / f"round-{r}"


def final_train_dir(ctx: RunContext) -> Path:
    """The training run the export and benchmark take: the last on-policy round's, else the train stage's."""
    rounds = ctx.config.onpolicy.rounds
    return round_dir(ctx.dir, rounds) / "train" if rounds else ctx.path("train")


def student_backend(adapter_dir: Path, *, quant: str, device=None):
    """The student (its NF4/int8 base + LoRA adapters, as trained) behind the teacher-backend interface,
    so that `teachers.generate` samples it with the same per-row seeding, resume and trace format."""
    from teachers.backends.hf import HFBackend

    class StudentBackend(HFBackend):
        accept = ("dir", "adapter")

    return StudentBackend(str(adapter_dir), device=device, quant=quant)


def mixed_records(samples: list[dict], teacher_kept: list[dict], *, mix: float, seed: int) -> list[dict]:
    """The round's training records: the student's samples plus teacher traces making up a `mix` share.

    The teacher traces are a seeded draw (without replacement, as many as there are) from the kept ones,
    so a rerun of the round draws the same."""
    if mix <= 0 or not teacher_kept:
        return samples
    want = min(len(teacher_kept), round(mix * len(samples) / (1.0 - mix)))
    drawn = random.Random(seed).sample(range(len(teacher_kept)), want)
    return samples + [{**teacher_kept[i], "id": f"teacher-{teacher_kept[i]['id']}"} for i in sorted(drawn)]


def run_onpolicy(ctx: RunContext, *, student: str, start_adapter: Path, problems: str,
                 cache_settings, echo=print) -> dict:
    """Run the rounds of `[onpolicy]` under ctx.dir/onpolicy; returns per-round summaries.

    `student` is the base the adapters sit on (the student stage's output), `start_adapter` the train
    stage's final/, `problems` the training problem spec, `cache_settings(data, out)` the `build_cache`
    keywords for the teacher.
    """
    from students.train import train
    from teachers.cache_build import build_cache
    from teachers.filter import filter_traces
    from teachers.generate import generate_traces

    cfg = ctx.config
    op, ranks = cfg.onpolicy, ctx.ranks
    # what a round's output depends on: every upstream section and [onpolicy] but for the number of rounds
    digest = replace(cfg, onpolicy=replace(op, rounds=1)).section_hash(
        "teacher", "run", "data", "generate", "filter", "cache", "student", "train", "onpolicy")
    kept_path = ctx.path("kept.jsonl")
    adapter = Path(start_adapter)
    rounds = []
    for r in range(1, op.rounds + 1):
        rdir = round_dir(ctx.dir, r)
        marker = rdir / "done.json"
        done = ranks.on_main(lambda: json.loads(marker.read_text()) if marker.is_file() else None)
        if done is not None:
            if done.get("hash") != digest:
                raise DistillError(f"on-policy round {r} in {rdir} was finished with other settings; "
                                   f"use a new run.dir or delete {rdir.parent}")
            echo(f"  round {r}/{op.rounds}: complete, skipped")
            rounds.append(done["summary"])
            adapter = rdir / "train" / "final"
            continue
        ranks.on_main(lambda: rdir.mkdir(parents=True, exist_ok=True))
        # 1. the student alone samples on the training prompts
        echo(f"  round {r}/{op.rounds}: student samples")
        backend = student_backend(adapter, quant=cfg.train.quant)
        gen = generate_traces(backend=backend, teacher=str(adapter), data=problems, out=rdir / "samples.jsonl",
                              samples=op.samples, temperature=op.temperature, top_p=op.top_p,
                              max_new_tokens=op.max_new_tokens or cfg.generate.max_new_tokens,
                              system_prompt=cfg.generate.system_prompt, limit=cfg.data.limit or None,
                              batch_size=cfg.generate.batch_size, seed=cfg.run.seed * 1000 + r, fields=cfg.data.fields,
                              split=cfg.data.split, progress=True, ranks=ranks)
        del backend
        gc.collect()

        # 2. the teacher alone caches its distribution on them (and on the mixed-in teacher traces)
        def write_records() -> dict:
            report = filter_traces(rdir / "samples.jsonl", rdir / "student.jsonl", keep="all", require_format=False,
                                   echo=None)
            samples = [json.loads(line) for line in (rdir / "student.jsonl").read_text().splitlines() if line]
            kept = [json.loads(line) for line in kept_path.read_text().splitlines() if line] if kept_path.is_file() else []
            records = mixed_records(samples, kept, mix=op.mix, seed=cfg.run.seed * 1000 + r)
            atomic_write_jsonl(rdir / "records.jsonl", records)
            return {"student_accuracy": report["accuracy"], "student_format_rate": report["format_rate"],
                    "student_samples": len(samples), "teacher_traces": len(records) - len(samples)}

        echo(f"  round {r}/{op.rounds}: teacher caches")
        mixed = ranks.on_main(write_records)
        manifest = build_cache(**cache_settings(rdir / "records.jsonl", rdir / "cache"))
        gc.collect()

        # 3. the student alone trains on that cache, from where the last round left it
        echo(f"  round {r}/{op.rounds}: student trains")
        settings = replace(cfg.train, student=student, cache=str(rdir / "cache"), out=rdir / "train",
                           seed=cfg.run.seed, resume=True, progress=True, init_adapter=str(adapter),
                           steps=op.steps if op.steps is not None else None,
                           epochs=None if op.steps is not None else 1.0)
        summary = train(settings)
        gc.collect()
        result = {"round": r, **mixed, "teacher_tokens_scored": int(manifest.num_tokens),
                  "student_new_tokens": gen["stats"].get("new_tokens"),
                  "final_eval_kl": summary.get("final_eval_kl"), "initial_eval_kl": summary.get("initial_eval_kl"),
                  "steps": summary.get("steps"), "train": str(rdir / "train")}
        ranks.on_main(lambda: atomic_write_json(marker, {"hash": digest, "summary": result}, sort_keys=True))
        rounds.append(result)
        adapter = rdir / "train" / "final"
    return {"rounds": rounds, "run": str(round_dir(ctx.dir, op.rounds) / "train")}
