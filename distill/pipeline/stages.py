"""The pipeline's stages, in order, each a thin call into the module that owns the work.

    teacher   import the packaged GGUF (or use a model dir / hub id as it is)    teachers/gguf_import.py
    generate  sample reasoning traces on the training problems                   teachers/generate.py
    filter    keep the verified traces (STaR / R1 rule rewards)                  teachers/filter.py
    cache     the teacher's top-k log-probs on the kept traces                   teachers/cache_build.py
    heldout   the same on held-out problems' reference solutions (for KL)        teachers/cache_build.py
    student   a student made from the teacher's layers (unless one is given)     students/init_student.py
    train     QLoRA student on the cache                                         students/train.py
    onpolicy  rounds of on-policy distillation (when [onpolicy] rounds > 0)      distill/pipeline/onpolicy.py
    export    a plain transformers checkpoint                                    students/export.py
    gguf      the same student as one GGUF file for llama.cpp (when [gguf] type)  students/export_gguf.py
    bench     student vs teacher: accuracy, agreement, cost                       distill/bench/runner.py

Each stage lists the config sections its output depends on, upstream ones included, so that the
runner reuses an output only while everything that made it is unchanged. Under `accelerate launch` the
parallel stages (generate, cache, heldout, train, bench) run on every process; the others on the main one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from distill.errors import DistillError
from distill.io import atomic_write_jsonl
from distill.pipeline.config import RunConfig
from distill.pipeline.runner import RunContext, Stage

UPSTREAM_TEACHER = ("teacher",)
UPSTREAM_TRACES = UPSTREAM_TEACHER + ("run", "data", "generate")
UPSTREAM_CACHE = UPSTREAM_TRACES + ("filter", "cache")
# the student depends on the kept traces too: importance:N measures its layers on them
UPSTREAM_STUDENT = UPSTREAM_TRACES + ("filter", "student")
UPSTREAM_TRAIN = UPSTREAM_CACHE + ("student", "train")
UPSTREAM_STUDENT_FINAL = UPSTREAM_TRAIN + ("onpolicy",)  # "onpolicy" counts only when its rounds are on


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
    if cfg.gguf is not None or cfg.model == "smollm2":
        source = Path(cfg.gguf) if cfg.gguf is not None else smollm2_gguf_path()
        out = import_gguf(source, _fresh(ctx.path("teacher")))
        return {"teacher": str(out), "source": str(source)}
    return {"teacher": cfg.model, "source": cfg.model}


def problem_source(config: RunConfig, *, split: str) -> str:
    """The problem spec (`distill.data.problems.load_problems`) of the [data] source for `split`."""
    data = config.data
    if data.source == "synthetic":
        # Training problems use the run seed; the benchmark's synthetic task uses its own seed.
        n = data.limit or 256
        return f"synthetic:{n}:{config.run.seed}" if split == data.split else "synthetic"
    if data.source == "gsm8k":
        return str(data.path) if data.path is not None else "gsm8k"
    return data.source


def stage_generate(ctx: RunContext) -> dict:
    from teachers.generate import generate_traces

    cfg = ctx.config
    settings = replace(cfg.generate, teacher=teacher_dir(ctx), data=problem_source(cfg, split=cfg.data.split),
                       out=ctx.path("traces.jsonl"), limit=cfg.data.limit or None, seed=cfg.run.seed,
                       fields=cfg.data.fields, split=cfg.data.split, trust_remote_code=cfg.teacher.trust_remote_code,
                       backend=cfg.teacher.backend, quant=cfg.teacher.quant, device_map=cfg.teacher.device_map,
                       progress=True, device=None)
    return generate_traces(**vars(settings)) | {"traces": str(ctx.path("traces.jsonl"))}


def stage_filter(ctx: RunContext) -> dict:
    from teachers.filter import filter_traces

    settings = replace(ctx.config.filter, traces=ctx.path("traces.jsonl"), out=ctx.path("kept.jsonl"))
    report = filter_traces(echo=lambda *_: None, **vars(settings))
    if not report["kept"]:
        raise DistillError(
            f"no trace survived the filter (0 of {report['traces']} kept, accuracy {report['accuracy']:.0%}); "
            "raise generate.samples or generate.max_new_tokens, or set filter.keep = 'best'"
        )
    summary = {k: v for k, v in report.items() if k != "per_prompt"}
    return {"kept": str(ctx.path("kept.jsonl")), "yield": summary}


def cache_settings(ctx: RunContext, data: Path, out: Path) -> dict:
    """`build_cache` keywords: the [cache] section, the teacher of [teacher], the data and output given."""
    cfg = ctx.config
    settings = replace(cfg.cache, teacher=teacher_dir(ctx), data=str(data), out=out, fields=None, split=None,
                       data_config=None, limit=None, as_chat=False, trust_remote_code=cfg.teacher.trust_remote_code,
                       quant=cfg.teacher.quant, device_map=cfg.teacher.device_map, backend=cfg.teacher.backend,
                       revision=None, device=None, progress=True)
    return vars(settings)


def stage_cache(ctx: RunContext) -> dict:
    from teachers.cache_build import build_cache

    manifest = build_cache(**cache_settings(ctx, ctx.path("kept.jsonl"), ctx.path("cache")))
    return {"cache": str(ctx.path("cache")), "sequences": manifest.num_samples,
            "tokens": manifest.num_tokens}


def heldout_records(config: RunConfig) -> list[dict]:
    """Held-out problems with their reference solutions as chat records: a teacher forward over them
    gives a KL / agreement set that the student never trained on, at no generation cost."""
    from distill.data.problems import load_problems
    from distill.models.sampling import DEFAULT_SYSTEM_PROMPT

    data = config.data
    if data.source == "synthetic":
        from distill.bench.tasks import SYNTHETIC_SEED
        spec = f"synthetic:{data.eval_limit}:{SYNTHETIC_SEED}"
    else:
        spec = problem_source(config, split="test")
    problems = load_problems(spec, split="test", limit=data.eval_limit, fields=data.fields)
    system = DEFAULT_SYSTEM_PROMPT if config.generate.system_prompt is None else config.generate.system_prompt
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

    records_path = ctx.ranks.on_main(lambda: atomic_write_jsonl(ctx.path("heldout.jsonl"), heldout_records(ctx.config)))
    manifest = build_cache(**cache_settings(ctx, records_path, ctx.path("heldout-cache")))
    return {"cache": str(ctx.path("heldout-cache")), "sequences": manifest.num_samples}


def stage_student(ctx: RunContext) -> dict:
    cfg = ctx.config.student
    if cfg.model:
        return {"student": cfg.model}
    from students.init_student import init_student

    calibration = cfg.calibration
    if calibration is None and cfg.keep_layers.strip().startswith("importance:"):
        calibration = ctx.path("kept.jsonl")  # the records the student will be trained on
    summary = init_student(teacher_dir(ctx), ctx.path("student-init"), keep_layers=cfg.keep_layers,
                           calibration=calibration, calibration_samples=cfg.calibration_samples,
                           calibration_max_length=cfg.calibration_max_length, importance_rounds=cfg.importance_rounds,
                           trust_remote_code=ctx.config.teacher.trust_remote_code, overwrite=True)
    return {"student": str(ctx.path("student-init")), "init": summary}


def stage_train(ctx: RunContext) -> dict:
    from students.train import train

    settings = replace(ctx.config.train, student=ctx.outputs["student"]["student"], cache=str(ctx.path("cache")),
                       out=ctx.path("train"), seed=ctx.config.run.seed, resume=True, progress=True)
    summary = train(settings)
    return {"run": str(ctx.path("train")), "summary": _jsonable(summary)}


def stage_onpolicy(ctx: RunContext) -> dict:
    from distill.pipeline.onpolicy import run_onpolicy

    cfg = ctx.config
    echo = print if ctx.ranks.is_main else (lambda *_: None)
    return run_onpolicy(ctx, student=ctx.outputs["student"]["student"], start_adapter=ctx.path("train", "final"),
                        problems=problem_source(cfg, split=cfg.data.split),
                        cache_settings=lambda data, out: cache_settings(ctx, data, out), echo=echo)


def stage_export(ctx: RunContext) -> dict:
    from distill.pipeline.onpolicy import final_train_dir
    from students.export import export_run

    settings = replace(ctx.config.export, run=final_train_dir(ctx), out=_fresh(ctx.path("export")), checkpoint=None)
    summary = export_run(**vars(settings))
    return {"export": str(ctx.path("export")), "summary": _jsonable(summary)}


def stage_gguf(ctx: RunContext) -> dict:
    """The student as one .gguf file (llama.cpp, Ollama, LM Studio): its own stage and config section,
    so that turning it on neither redoes the export nor invalidates a finished benchmark."""
    from students.export import export_run

    from distill.pipeline.onpolicy import final_train_dir

    kind = ctx.config.gguf.type
    out = ctx.path(f"student-{kind}.gguf")
    summary = export_run(final_train_dir(ctx), out, format="gguf", gguf_type=kind, overwrite=True)
    return {"gguf": str(out), "summary": _jsonable(summary)}


def bench_task(config: RunConfig) -> str:
    """The benchmark's problems: [bench] task, or else the [data] source's held-out ones."""
    if config.bench.task:
        return config.bench.task
    if config.data.source == "synthetic":
        return "synthetic"
    return problem_source(config, split="test")


def stage_bench(ctx: RunContext) -> dict:
    from distill.bench.runner import run_bench

    cfg = ctx.config
    settings = vars(replace(
        cfg.bench, task=bench_task(cfg), out=ctx.ranks.on_main(lambda: _fresh(ctx.path("bench"))), held_out_cache=ctx.path("heldout-cache"),
        seed=cfg.run.seed, system_prompt=cfg.generate.system_prompt, trust_remote_code=cfg.teacher.trust_remote_code,
        fields=cfg.bench.fields if cfg.bench.task else cfg.data.fields, progress=True)).copy()
    settings.pop("enabled"), settings.pop("models")
    results = run_bench({"teacher": teacher_dir(ctx), "student": str(ctx.path("export"))}, **settings)
    return {"bench": str(ctx.path("bench")), "files": results["files"]}


# Seconds each stage of the embedded demo (distill/pipeline/demo.toml) is expected to take on a quiet
# 2-core AVX2 x86 CPU (AMD EPYC), for `expected_seconds` to scale by a config's work: `distill demo`
# measured there on 2026-12-01 with this config (5 min 17 s in all; the previous, larger config took
# 6 min 15 s on that host and 7 min 57 s on a slower one). The runner rescales them by the pace of the
# stages that ran, so a slower host gets a longer estimate after its first stage.
REFERENCE_SECONDS = {"teacher": 21.8, "generate": 45.2, "filter": 0.1, "cache": 36.5, "heldout": 9.6,
                     "student": 35.6, "train": 88.4, "export": 1.8, "gguf": 3.7, "bench": 72.3}


def _work(config: RunConfig) -> dict[str, float]:
    """Each stage's amount of work in a unit proportional to its time (tokens generated, scored or
    trained on), compared between two configs only."""
    d, g, c, t, b = config.data, config.generate, config.cache, config.train, config.bench
    problems = d.limit or 256
    rows = problems * g.samples
    length = t.max_length or c.max_length
    per_step = (t.batch_tokens if isinstance(t.batch_tokens, int) else (t.batch_size or 8) * length) * t.grad_accum
    steps = t.steps or (t.epochs or 1.0) * rows * length / max(per_step, 1)
    imports = 1.0 if (config.teacher.gguf or config.teacher.model == "smollm2") else 0.0
    rows_each = 1 + (b.samples if b.samples > 1 else 0)
    return {
        "teacher": imports,
        "generate": rows * g.max_new_tokens,
        "filter": rows,
        "cache": rows * c.max_length,
        "heldout": d.eval_limit * c.max_length,
        "student": 0.0 if config.student.model else 1.0,
        "train": steps * per_step,
        "export": 1.0,
        "gguf": 1.0 if config.gguf.type else 0.0,
        "bench": 2 * (b.limit or 50) * rows_each * b.max_new_tokens,
    }


def expected_seconds(config: RunConfig) -> dict[str, float]:
    """About how long each stage of `config` takes on the reference CPU: the demo's measured seconds
    scaled by the work (tokens generated, scored or trained on) relative to the demo's."""
    from distill.pipeline.commands import DEMO_CONFIG
    from distill.pipeline.config import load_config

    demo = _work(load_config(DEMO_CONFIG))
    work = _work(config)
    return {name: REFERENCE_SECONDS[name] * (work[name] / demo[name] if demo[name] else 1.0) for name in work}


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
    Stage("onpolicy", UPSTREAM_STUDENT_FINAL, stage_onpolicy, enabled=lambda c: c.onpolicy.rounds > 0, parallel=True),
    Stage("export", UPSTREAM_STUDENT_FINAL + ("export",), stage_export),
    Stage("gguf", UPSTREAM_STUDENT_FINAL + ("gguf",), stage_gguf, enabled=lambda c: bool(c.gguf.type)),
    Stage("bench", UPSTREAM_STUDENT_FINAL + ("export", "bench"), stage_bench, enabled=lambda c: c.bench.enabled, parallel=True),
]
