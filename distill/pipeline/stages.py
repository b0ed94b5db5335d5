"""The pipeline's stages, in order, each a thin call into the module that owns the work.

    teacher   import the packaged GGUF (or use a model dir / hub id as it is)    teachers/gguf_import.py
    generate  sample reasoning traces on the training problems                   teachers/generate.py
    filter    keep the verified traces (STaR / R1 rule rewards)                  teachers/filter.py
    cache     the teacher's top-k log-probs on the kept traces                   teachers/cache_build.py
    heldout   the same on held-out problems' reference solutions (for KL)        teachers/cache_build.py
    student   a student made from the teacher's layers (unless one is given)     students/init_student.py
    train     QLoRA student on the cache                                         students/train.py
    export    a plain transformers checkpoint                                    students/export.py
    bench     student vs teacher: accuracy, agreement, cost                       distill/bench/runner.py

Each stage lists the config sections its output depends on, upstream ones included, so that the
runner reuses an output only while everything that made it is unchanged. Under `accelerate launch` the
parallel stages (generate, cache, heldout, train, bench) run on every process; the others on the main one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distill.config import RunConfig
from distill.errors import DistillError
from distill.io import atomic_write_jsonl
from distill.pipeline.runner import RunContext, Stage

UPSTREAM_TEACHER = ("teacher",)
UPSTREAM_TRACES = UPSTREAM_TEACHER + ("run", "data", "generate")
UPSTREAM_CACHE = UPSTREAM_TRACES + ("filter", "cache")
UPSTREAM_STUDENT = UPSTREAM_TEACHER + ("student",)
UPSTREAM_TRAIN = UPSTREAM_CACHE + ("student", "train")


def teacher_dir(ctx: RunContext) -> str:
    return ctx.outputs["teacher"]["teacher"]


def _fresh(path: Path) -> Path:
    """Remove what an interrupted, non-resumable stage left, so that it can start over cleanly."""
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return path


# ------------------------------------------------------------------------------------------ stages


def stage_teacher(ctx: RunContext) -> dict:
    from teachers.gguf_import import import_gguf, smollm2_gguf_path

    cfg = ctx.config.teacher
    if cfg.gguf or cfg.model == "smollm2":
        source = Path(cfg.gguf) if cfg.gguf else smollm2_gguf_path()
        out = import_gguf(source, _fresh(ctx.path("teacher")))
        return {"teacher": str(out), "source": str(source)}
    return {"teacher": cfg.model, "source": cfg.model}


def problem_source(config: RunConfig, *, split: str) -> tuple[str, str]:
    """The data spec `teachers.generate.load_problems` reads for `split`, and that split's name."""
    data = config.data
    if data.source == "synthetic":
        # Training problems use the run seed; the benchmark's synthetic task uses its own seed.
        n = data.limit or 256
        return (f"synthetic:{n}:{config.run.seed}" if split == "train" else "synthetic"), split
    if data.source == "gsm8k":
        return (data.path or "gsm8k"), split
    return data.source, split


def stage_generate(ctx: RunContext) -> dict:
    from teachers.generate import generate_traces

    cfg, gen = ctx.config, ctx.config.generate
    data, split = problem_source(cfg, split=cfg.data.split)
    return generate_traces(
        teacher=teacher_dir(ctx), data=data, split=split, out=ctx.path("traces.jsonl"),
        samples=gen.samples, temperature=gen.temperature, top_p=gen.top_p,
        max_new_tokens=gen.max_new_tokens, system_prompt=gen.system_prompt or None,
        limit=cfg.data.limit or None, batch_size=gen.batch_size, seed=cfg.run.seed,
        trust_remote_code=cfg.teacher.trust_remote_code,
    ) | {"traces": str(ctx.path("traces.jsonl"))}


def stage_filter(ctx: RunContext) -> dict:
    from teachers.filter import filter_traces

    cfg = ctx.config.filter
    report = filter_traces(ctx.path("traces.jsonl"), ctx.path("kept.jsonl"), keep=cfg.keep,
                           require_format=cfg.require_format, echo=lambda *_: None)
    if not report["kept"]:
        raise DistillError(
            f"no trace survived the filter (0 of {report['traces']} kept, accuracy {report['accuracy']:.0%}); "
            "raise generate.samples or generate.max_new_tokens, or set filter.keep = 'best'"
        )
    summary = {k: v for k, v in report.items() if k != "per_prompt"}
    return {"kept": str(ctx.path("kept.jsonl")), "yield": summary}


def stage_cache(ctx: RunContext) -> dict:
    from teachers.cache_build import build_cache

    cfg = ctx.config
    manifest = build_cache(
        teacher_dir(ctx), ctx.path("kept.jsonl"), ctx.path("cache"), top_k=cfg.cache.top_k,
        temperature=cfg.cache.temperature, max_length=cfg.cache.max_length, dtype=cfg.cache.dtype,
        batch_size=cfg.cache.batch_size, trust_remote_code=cfg.teacher.trust_remote_code,
        quant=cfg.teacher.quant,
    )
    return {"cache": str(ctx.path("cache")), "sequences": manifest.num_samples,
            "tokens": manifest.num_tokens}


def heldout_records(config: RunConfig) -> list[dict]:
    """Held-out problems with their reference solutions as chat records: a teacher forward over them
    gives a KL / agreement set that the student never trained on, at no generation cost."""
    from distill.models.sampling import DEFAULT_SYSTEM_PROMPT
    from teachers.generate import load_problems

    data = config.data
    if data.source == "synthetic":
        from distill.bench.tasks import SYNTHETIC_SEED
        spec = f"synthetic:{data.eval_limit}:{SYNTHETIC_SEED}"
    else:
        spec, _ = problem_source(config, split="test")
    problems = load_problems(spec, split="test", limit=data.eval_limit)
    system = config.generate.system_prompt or DEFAULT_SYSTEM_PROMPT
    return [
        {"id": f"heldout-{p['id']}", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": p["question"]},
            {"role": "assistant", "content": p["answer"]},
        ]}
        for p in problems
    ]


def stage_heldout(ctx: RunContext) -> dict:
    from teachers.cache_build import build_cache

    cfg = ctx.config
    records_path = ctx.ranks.on_main(lambda: atomic_write_jsonl(ctx.path("heldout.jsonl"), heldout_records(cfg)))
    manifest = build_cache(
        teacher_dir(ctx), records_path, ctx.path("heldout-cache"), top_k=cfg.cache.top_k,
        temperature=cfg.cache.temperature, max_length=cfg.cache.max_length, dtype=cfg.cache.dtype,
        batch_size=cfg.cache.batch_size, trust_remote_code=cfg.teacher.trust_remote_code,
        quant=cfg.teacher.quant,
    )
    return {"cache": str(ctx.path("heldout-cache")), "sequences": manifest.num_samples}


def stage_student(ctx: RunContext) -> dict:
    cfg = ctx.config.student
    if cfg.model:
        return {"student": cfg.model}
    from students.init_student import init_student

    summary = init_student(teacher_dir(ctx), ctx.path("student-init"), cfg.keep_layers,
                           trust_remote_code=ctx.config.teacher.trust_remote_code, overwrite=True)
    return {"student": str(ctx.path("student-init")), "init": summary}


def stage_train(ctx: RunContext) -> dict:
    from students.train import TrainConfig, train

    cfg, t, s = ctx.config, ctx.config.train, ctx.config.student
    summary = train(TrainConfig(
        student=ctx.outputs["student"]["student"], cache=str(ctx.path("cache")), out=str(ctx.path("train")),
        quant=s.quant, lora_r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
        gradient_checkpointing=s.gradient_checkpointing,
        trust_remote_code=s.trust_remote_code, loss=t.loss, temperature=t.temperature or None,
        retemper_tail=t.retemper_tail or None,
        kd_weight=t.kd_weight, ce_weight=t.ce_weight, steps=None if t.epochs else t.steps,
        epochs=t.epochs or None, lr=t.lr, batch_size=t.batch_size, grad_accum=t.grad_accum,
        warmup_steps=t.warmup_steps, eval_every=t.eval_every, eval_fraction=t.eval_fraction,
        max_length=cfg.cache.max_length, seed=cfg.run.seed, resume=True,
    ))
    return {"run": str(ctx.path("train")), "summary": _jsonable(summary)}


def stage_export(ctx: RunContext) -> dict:
    from students.export import export_run

    cfg = ctx.config.export
    summary = export_run(ctx.path("train"), _fresh(ctx.path("export")), format=cfg.format, dtype=cfg.dtype)
    return {"export": str(ctx.path("export")), "summary": _jsonable(summary)}


def bench_task(config: RunConfig) -> str:
    if config.bench.task:
        return config.bench.task
    if config.data.source == "synthetic":
        return "synthetic"
    if config.data.source == "gsm8k":
        return str(Path(config.data.path) / "test.jsonl") if config.data.path else "gsm8k"
    return config.data.source


def stage_bench(ctx: RunContext) -> dict:
    from distill.bench.runner import run_bench

    cfg = ctx.config
    out = ctx.ranks.on_main(lambda: _fresh(ctx.path("bench")))
    results = run_bench(
        {"teacher": teacher_dir(ctx), "student": str(ctx.path("export"))},
        task=bench_task(cfg), out=out, limit=cfg.bench.limit,
        samples=cfg.bench.samples, select=cfg.bench.select, held_out_cache=str(ctx.path("heldout-cache")),
        max_new_tokens=cfg.bench.max_new_tokens, batch_size=cfg.generate.batch_size, seed=cfg.run.seed,
        system_prompt=cfg.generate.system_prompt or None, trust_remote_code=cfg.teacher.trust_remote_code,
    )
    return {"bench": str(ctx.path("bench")), "files": results["files"]}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# parallel=True: every process of `accelerate launch` runs the stage and takes a share of its work.
STAGES = [
    Stage("teacher", UPSTREAM_TEACHER, stage_teacher),
    Stage("generate", UPSTREAM_TRACES, stage_generate, parallel=True),
    Stage("filter", UPSTREAM_TRACES + ("filter",), stage_filter),
    Stage("cache", UPSTREAM_CACHE, stage_cache, parallel=True),
    Stage("heldout", UPSTREAM_TRACES + ("cache",), stage_heldout, parallel=True),  # uses the system prompt too
    Stage("student", UPSTREAM_STUDENT, stage_student),
    Stage("train", UPSTREAM_TRAIN, stage_train, parallel=True),
    Stage("export", UPSTREAM_TRAIN + ("export",), stage_export),
    Stage("bench", UPSTREAM_TRAIN + ("export", "bench"), stage_bench, enabled=lambda c: c.bench.enabled, parallel=True),
]
