"""Run the stages of a config in order, skipping what is complete and resuming what was interrupted.

Each stage writes under the run folder and, when it finishes, a marker `stages/<name>.json` holding
the hash of the config sections its output depends on (its own and every upstream one) and its wall
time. On a rerun a stage whose marker matches is skipped; a stage without a marker runs again, and
the stages themselves resume (trace generation, cache build and training each pick up where a killed
run stopped). A marker whose hash differs means the config changed under a finished output: that is
refused in one line rather than silently mixing two configurations in one run folder.
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


@dataclass
class RunContext:
    """What the stages share: the config, the run folder and each finished stage's outputs."""

    config: RunConfig
    dir: Path
    outputs: dict[str, dict] = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections (with upstream ones) that determine the output
    run: Callable[[RunContext], dict]  # does the work, returns a JSON-able summary of outputs
    enabled: Callable[[RunConfig], bool] = lambda config: True


def run_stages(config: RunConfig, stages: list[Stage], *, echo=typer.echo) -> RunContext:
    """Run `stages` in order under `config.run.dir`; returns the context with every stage's outputs."""
    ctx = RunContext(config=config, dir=Path(config.run.dir))
    ctx.dir.mkdir(parents=True, exist_ok=True)
    (ctx.dir / "stages").mkdir(exist_ok=True)
    atomic_write_json(ctx.dir / "config.json", config.to_dict(), sort_keys=True)
    active = [s for s in stages if s.enabled(config)]
    for number, stage in enumerate(active, 1):
        marker = ctx.dir / "stages" / f"{stage.name}.json"
        digest = config.section_hash(*stage.sections)
        if marker.exists():
            done = json.loads(marker.read_text())
            if done.get("hash") != digest:
                raise DistillError(
                    f"stage '{stage.name}' in {ctx.dir} was finished with other settings "
                    f"(sections {', '.join(stage.sections)} changed); use a new run.dir or delete {marker}"
                )
            ctx.outputs[stage.name] = done["outputs"] | {"wall_s": done["wall_s"], "skipped": True}
            echo(f"[{number}/{len(active)}] {stage.name}: complete, skipped")
            continue
        echo(f"[{number}/{len(active)}] {stage.name} ...")
        start = time.perf_counter()
        outputs = stage.run(ctx)
        wall = round(time.perf_counter() - start, 2)
        atomic_write_json(marker, {"hash": digest, "wall_s": wall, "outputs": outputs}, sort_keys=True)
        ctx.outputs[stage.name] = outputs | {"wall_s": wall, "skipped": False}
        echo(f"[{number}/{len(active)}] {stage.name}: done in {wall:.1f}s")
    return ctx
