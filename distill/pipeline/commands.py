"""`distill run CONFIG.toml` (every stage from one config) and `distill demo` (the embedded default)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from distill.pipeline.config import RunConfig, load_config
from distill.errors import DistillError
from distill.io import atomic_write_json

DEMO_CONFIG = Path(__file__).with_name("demo.toml")


def demo_config(out: str | Path, *, gsm8k: str | Path | None = None, quick: bool = False) -> RunConfig:
    """The embedded default: SmolLM2-135M-Instruct teaches a half-depth NF4 + LoRA copy of itself (the 15 layers
    that matter most to its output, `importance:15`).

    `quick` shrinks every stage (for CI and smoke tests); the stages and code paths stay the same.
    """
    config = load_config(DEMO_CONFIG)
    config.run.dir = Path(out).resolve()
    if gsm8k:
        config.data.source, config.data.path = "gsm8k", Path(gsm8k).resolve()
    if quick:
        config.data.limit, config.data.eval_limit = 4, 4
        config.generate.samples, config.generate.max_new_tokens = 2, 48
        config.cache.max_length = 256
        config.student.calibration_samples, config.student.calibration_max_length = 1, 160
        config.train.steps, config.train.eval_every, config.train.warmup_steps = 4, 4, 1
        config.train.batch_size = 4
        config.bench.limit, config.bench.samples, config.bench.max_new_tokens = 2, 2, 32
    return config


def run_pipeline(config: RunConfig, *, echo=typer.echo) -> dict:
    """Run every stage of `config`; print and return the per-stage summary."""
    from distill.pipeline.runner import run_stages
    from distill.pipeline.stages import STAGES, expected_seconds

    ctx = run_stages(config, STAGES, echo=echo, expected=expected_seconds(config))
    summary = {"run_dir": str(ctx.dir), "stages": ctx.outputs}
    if not ctx.ranks.is_main:  # the main process writes and prints the summary
        return summary
    atomic_write_json(ctx.dir / "summary.json", summary, default=str)
    echo("")
    echo(stage_table(ctx.outputs))
    bench = ctx.outputs.get("bench")
    if bench:
        from distill.bench.report import terminal_summary

        results = json.loads((Path(bench["bench"]) / "results.json").read_text())
        echo("")
        echo(terminal_summary(results, bench["files"]))
    return summary


def stage_table(outputs: dict[str, dict]) -> str:
    """A Markdown table of each stage's wall time, with the filter's yield."""
    lines = ["| stage | wall time | CPU time | note |", "|---|---:|---:|---|"]
    for name, out in outputs.items():
        note = "reused" if out.get("skipped") else ""
        if name == "filter" and "yield" in out:
            y = out["yield"]
            note = (note + " " if note else "") + (
                f"kept {y['kept']}/{y['traces']} traces, teacher accuracy {y['accuracy']:.0%}, "
                f"{y['prompts_kept']}/{y['prompts']} problems")
            if y.get("rationalized_traces"):
                note += (f"; solved by sampling {y['solved_by_sampling']}, by STaR rationalization "
                         f"{y['solved_by_rationalization']}")
        if name == "train" and out.get("summary", {}).get("final_eval_kl") is not None:
            t = out["summary"]
            start = f"{t['initial_eval_kl']:.3f} -> " if t.get("initial_eval_kl") is not None else ""
            note = (note + " " if note else "") + (
                f"{t['steps']} steps, held-out KL {start}{t['final_eval_kl']:.3f}, "
                f"top-1 agreement {t['final_top1_agreement']:.1%}")
        if name == "gguf" and "summary" in out:
            g = out["summary"]
            note = (note + " " if note else "") + f"{Path(g['out']).name}, {g['bytes'] / 2**20:.1f} MiB ({g['architecture']}, {g['gguf_type']})"
        if name == "onpolicy" and out.get("rounds"):
            note = (note + " " if note else "") + "; ".join(
                f"round {r['round']}: student accuracy {r['student_accuracy']:.0%}, {r['teacher_tokens_scored']} teacher "
                f"tokens" + (f", held-out KL {r['final_eval_kl']:.3f}" if r.get("final_eval_kl") is not None else "")
                for r in out["rounds"])
        if name in ("cache", "heldout") and "sequences" in out:
            note = (note + " " if note else "") + f"{out['sequences']} sequences"
        cpu = f"{out['cpu_s']:.1f} s" if out.get("cpu_s") is not None else ""
        lines.append(f"| {name} | {out.get('wall_s', 0):.1f} s | {cpu} | {note} |")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_command(
        config: Path = typer.Argument(..., help="A TOML run config (see examples/ and docs/pipeline.md)."),
        out: Optional[Path] = typer.Option(None, "--out", help="The run folder (default: [run] dir of CONFIG)."),
    ) -> None:
        """Run every stage of CONFIG: teacher, generate, filter, cache, student, train, export, bench.

        Finished stages are skipped, interrupted ones resume: rerun the same command after a crash.
        On several processes: `accelerate launch --multi_gpu --num_processes N $(which distill) run CONFIG` (docs/scale-out.md).
        """
        cfg = load_config(config)
        if out is not None:
            cfg.run.dir = out.resolve()
        run_pipeline(cfg)

    @app.command("demo")
    def demo_command(
        out: Path = typer.Option(Path("demo-run"), "--out", help="The run folder (rerun to resume or reuse)."),
        gsm8k: Optional[Path] = typer.Option(None, "--gsm8k", help="A local GSM8K folder (train.jsonl, test.jsonl) instead of synthetic problems."),
        quick: bool = typer.Option(False, "--quick/--no-quick", help="Tiny sizes: a smoke test of every stage (83 s on a quiet 2-core CPU, a fifth of it the teacher import)."),
    ) -> None:
        """The embedded default, no network: SmolLM2-135M-Instruct (packaged GGUF) teaches a
        half-depth NF4 + LoRA student on synthetic arithmetic problems, then student vs teacher."""
        if gsm8k is not None and not gsm8k.is_dir():
            raise DistillError(f"--gsm8k {gsm8k} is not a folder with train.jsonl and test.jsonl")
        run_pipeline(demo_config(out, gsm8k=gsm8k, quick=quick))
