"""Run the stages of a config in order, skipping what is complete and resuming what was interrupted.

Each stage writes under the run folder and, when it finishes, a marker `stages/<name>.json` holding
the hash of the config sections its output depends on (its own and every upstream one) and its wall
time. On a rerun a stage whose marker matches is skipped; a stage without a marker runs again, and
the stages themselves resume (trace generation, cache build and training each pick up where a killed
run stopped). A marker whose hash differs means the config changed under a finished output: that is
refused in one line rather than silently mixing two configurations in one run folder.

Under `accelerate launch --multi_gpu --num_processes N ... distill run CONFIG` every process walks the same stages.
A `parallel` stage (trace generation, cache builds, training, benchmark) runs on every process, which
share its work; any other stage runs on the main process while the others wait. Only the main process
decides what is skipped and writes the run folder's own files (config.json, the stage markers), so
the processes never disagree about where they are.

Given each stage's expected seconds (`expected`, e.g. `distill.pipeline.stages.expected_seconds`),
the runner prints after every stage about how long the rest will take: the expected times of the
stages left, scaled by how much faster or slower than expected the stages run so far were here.
Why: a demo promised to take minutes must say early when a slow machine will take longer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import typer

from distill.pipeline.config import RunConfig
from distill.errors import DistillError
from distill.io import atomic_write_json
from distill.ranks import Ranks, current_ranks


@dataclass
class RunContext:
    """What the stages share: the config, the run folder, each finished stage's outputs, the processes."""

    config: RunConfig
    dir: Path
    outputs: dict[str, dict] = field(default_factory=dict)
    ranks: Ranks = field(default_factory=Ranks)

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections (with upstream ones) that determine the output
    run: Callable[[RunContext], dict]  # does the work, returns a JSON-able summary of outputs
    enabled: Callable[[RunConfig], bool] = lambda config: True
    parallel: bool = False  # runs on every process (which share its work), else on the main one only


def remaining_seconds(expected: dict[str, float], done: list[tuple[str, float]], left: list[str]) -> float:
    """Expected seconds of the stages `left`, scaled by actual / expected over the stages `done`
    here ((name, wall seconds) of those that ran, not skipped), the ratio kept within [1/4, 8]."""
    spent = sum(w for _, w in done)
    planned = sum(expected.get(n, 0.0) for n, _ in done)
    factor = min(max(spent / planned, 0.25), 8.0) if planned > 1.0 and spent > 0 else 1.0
    return factor * sum(expected.get(n, 0.0) for n in left)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def run_stages(config: RunConfig, stages: list[Stage], *, echo=typer.echo, ranks: Ranks | None = None,
               expected: dict[str, float] | None = None) -> RunContext:
    """Run `stages` in order under `config.run.dir`; returns the context with every stage's outputs.

    With `expected` (seconds per stage name) each stage's line ends with the time the rest should take.
    """
    ranks = ranks or current_ranks()
    ctx = RunContext(config=config, dir=Path(config.run.dir), ranks=ranks)
    if not ranks.is_main:
        echo = lambda *_args, **_kw: None  # noqa: E731 - one process speaks

    def open_run() -> None:
        ctx.dir.mkdir(parents=True, exist_ok=True)
        (ctx.dir / "stages").mkdir(exist_ok=True)
        atomic_write_json(ctx.dir / "config.json", config.to_dict(), sort_keys=True)

    ranks.on_main(open_run)
    active = [s for s in stages if s.enabled(config)]
    ran: list[tuple[str, float]] = []

    def left_note(number: int) -> str:
        if expected is None or number >= len(active):
            return ""
        rest = remaining_seconds(expected, ran, [s.name for s in active[number:]])
        return f"; about {_duration(rest)} left"

    for number, stage in enumerate(active, 1):
        marker = ctx.dir / "stages" / f"{stage.name}.json"
        digest = config.section_hash(*stage.sections)
        done = ranks.on_main(lambda: _finished(marker, digest, stage, ctx.dir))
        if done is not None:
            ctx.outputs[stage.name] = done["outputs"] | {"wall_s": done["wall_s"], "cpu_s": done.get("cpu_s"),
                                                         "skipped": True}
            echo(f"[{number}/{len(active)}] {stage.name}: complete, skipped{left_note(number)}")
            continue
        echo(f"[{number}/{len(active)}] {stage.name} ...")
        start, cpu_start = time.perf_counter(), time.process_time()
        if stage.parallel:
            outputs = ranks.broadcast(stage.run(ctx))
        else:
            outputs = ranks.on_main(lambda: stage.run(ctx))
        wall = round(time.perf_counter() - start, 2)
        # this process's CPU seconds (all its threads): on a shared machine the wall time also measures the others
        cpu = round(time.process_time() - cpu_start, 2)
        ranks.on_main(lambda: atomic_write_json(marker, {"hash": digest, "wall_s": wall, "cpu_s": cpu,
                                                         "outputs": outputs}, sort_keys=True))
        ctx.outputs[stage.name] = outputs | {"wall_s": wall, "cpu_s": cpu, "skipped": False}
        ran.append((stage.name, wall))
        echo(f"[{number}/{len(active)}] {stage.name}: done in {wall:.1f}s{left_note(number)}")
    return ctx


def _finished(marker: Path, digest: str, stage: Stage, run_dir: Path) -> dict | None:
    """The marker of a stage finished with these settings, None when it must run; refuses other settings."""
    if not marker.exists():
        return None
    done = json.loads(marker.read_text())
    if done.get("hash") != digest:
        raise DistillError(
            f"stage '{stage.name}' in {run_dir} was finished with other settings "
            f"(sections {', '.join(stage.sections)} changed); use a new run.dir or delete {marker}"
        )
    return done
