"""One TOML file describes a whole run: teacher, data, generation, filter, cache, student, training,
export and benchmark. `load_config` validates it up front, so that a typo fails in one line naming
the key before an hour of teacher generation, not after.

A stage's section IS that stage's settings dataclass (`[train]` is `students.train.TrainConfig`,
`[cache]` is `teachers.cache_settings.CacheBuildConfig`, ...), minus the fields the pipeline fills in
itself (`WIRED`: the model paths, the run folder, the seed...). So a key has the same name, default,
choices and bounds as the matching `distill` CLI option, by construction; `tests/test_config.py`
checks that every field of every stage is reachable from both. Three sections belong to the pipeline
alone: `[run]`, `[teacher]` and `[data]`. Relative paths are resolved against the config file's
folder, so that a config travels with its data.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

from distill.bench.runner import BenchConfig
from distill.errors import DistillError
from distill.models.quant import QUANT_CHOICES
from distill.options import blank, option, section_values, settings_from_table
from students.export import GGUF_TYPES, ExportConfig
from students.init_student import StudentInitConfig
from students.train import TrainConfig
from teachers.cache_settings import DEVICE_MAP_CHOICES, CacheBuildConfig
from teachers.filter import FilterConfig
from teachers.generate import GenerateConfig

try:  # Python 3.11+; on 3.10 the same parser ships as the `tomli` package (a dependency there).
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DATA_SOURCES = "synthetic | gsm8k | a JSONL file or a folder with {split}.jsonl"


# ------------------------------------------------------------------------------------------ pipeline sections


@dataclass
class RunSection:
    dir: Path = option(Path("runs/distill"), "Every stage writes under this folder.")
    seed: int = option(0, "Seed of trace sampling, of the training data order and of the benchmark's sampling.")


@dataclass
class TeacherSection:
    model: str = option("smollm2", "A local model dir, a hub id, or smollm2 (the packaged GGUF).")
    gguf: Path | None = option(None, "A GGUF file to import as the teacher (overrides model).")
    trust_remote_code: bool = option(False, "Allow the teacher's model directory to run its own code.")
    quant: str = option("none", "Load the teacher quantized while caching (a teacher larger than the GPU).",
                        choices=QUANT_CHOICES)
    backend: str = option("hf", "Teacher backend that generates and scores (hf: Hugging Face transformers).")
    device_map: str | None = option(None, "auto: spread a teacher too big for one GPU over this machine's GPUs, then "
                                          "the CPU, while generating and caching.", choices=DEVICE_MAP_CHOICES)


@dataclass
class DataSection:
    source: str = option("synthetic", f"The training problems: {DATA_SOURCES}.")
    split: str = option("train", "Split read for the training problems.")
    limit: int = option(64, "Problems used for traces (0 = all).", minimum=0)
    eval_limit: int = option(32, "Held-out problems for the held-out cache (test split, or fresh synthetic ones).",
                             minimum=1)
    path: Path | None = option(None, "A local copy of GSM8K (a folder with train.jsonl/test.jsonl); unset = the hub.")
    fields: dict[str, str] | None = option(None, "Column names of a JSONL source: {question = ..., answer = ..., id = ...}.",
                                           choices=("question", "answer", "id"))


@dataclass
class StudentSection(StudentInitConfig):
    model: str = option("", "A student model dir or hub id; empty = made from the teacher by keeping layers.")

    def check(self, name) -> None:
        """In a run, importance:N without `calibration` measures the layers on the kept traces."""


@dataclass
class BenchSection(BenchConfig):
    task: str = option("", "Problems to benchmark on; empty = the [data] source's held-out problems "
                           "(GSM8K test, or synthetic ones with the benchmark's seed).")
    enabled: bool = option(True, "Run the benchmark stage.")


@dataclass
class GgufSection:
    type: str = option("", "Also write the trained student as one GGUF file for llama.cpp / Ollama / LM Studio: "
                           "f16, q8_0, q4_1, q4_0 or f32; empty: skip.", choices=("",) + GGUF_TYPES)


@dataclass
class OnPolicySection:
    """On-policy distillation with a cached teacher (GKD, Agarwal et al. 2024), in rounds after [train]."""

    rounds: int = option(0, "Rounds of on-policy distillation after the train stage: the student samples on the training "
                            "prompts, the teacher caches its distribution on those samples, the student trains on that "
                            "cache (0: off).", minimum=0)
    samples: int = option(1, "Student samples per training prompt in each round.", minimum=1)
    mix: float = option(0.0, "Share of each round's training sequences that are teacher traces (kept traces, scored "
                             "again with the round's samples); 0: the student's samples only.", minimum=0, exclusive_maximum=1)
    temperature: float = option(1.0, "The student's sampling temperature (1: its own distribution).", minimum=0)
    top_p: float = option(1.0, "The student's nucleus sampling mass.", exclusive_minimum=0, maximum=1)
    max_new_tokens: int | None = option(None, "Longest student sample; default [generate] max_new_tokens.", minimum=1)
    steps: int | None = option(None, "Optimizer steps per round; default: one epoch of the round's cache "
                                     "([train] sets everything else).", minimum=1)


# ------------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class Section:
    """How one [table] maps onto a settings dataclass: `wired` fields are set by the pipeline (field ->
    where from), so they are not keys; `overrides` are defaults the pipeline changes (field -> why)."""

    cls: type
    stage: type | None = None  # the stage's own settings class, when the section is (a subclass of) it
    wired: Mapping[str, str] = field(default_factory=dict)
    overrides: Mapping[str, str] = field(default_factory=dict)


_TEACHER = "from [teacher]"
SECTIONS: dict[str, Section] = {
    "run": Section(RunSection),
    "teacher": Section(TeacherSection),
    "data": Section(DataSection),
    "generate": Section(GenerateConfig, GenerateConfig, wired={
        "teacher": "the teacher stage's model", "data": "from [data] source (and path)", "out": "run.dir/traces.jsonl",
        "limit": "[data] limit", "seed": "[run] seed", "fields": "[data] fields", "split": "[data] split",
        "trust_remote_code": _TEACHER, "backend": _TEACHER, "quant": _TEACHER, "device_map": _TEACHER,
        "progress": "always shown", "device": "the default device (cuda when available)"}),
    "filter": Section(FilterConfig, FilterConfig, wired={"traces": "run.dir/traces.jsonl", "out": "run.dir/kept.jsonl"}),
    "cache": Section(CacheBuildConfig, CacheBuildConfig, wired={
        "teacher": "the teacher stage's model", "data": "the kept traces (chat records)", "out": "run.dir/cache",
        "fields": "kept traces need no mapping", "split": "kept traces have no splits",
        "data_config": "kept traces have no hub config", "limit": "every kept trace is cached",
        "as_chat": "kept traces are chat records already", "trust_remote_code": _TEACHER, "quant": _TEACHER,
        "device_map": _TEACHER,
        "backend": _TEACHER, "revision": "the teacher is used as [teacher] model names it",
        "device": "the default device (cuda when available)", "progress": "always shown"}),
    "student": Section(StudentSection, StudentInitConfig, wired={
        "teacher": "the teacher stage's model", "out": "run.dir/student-init", "trust_remote_code": _TEACHER}),
    "train": Section(TrainConfig, TrainConfig, wired={
        "student": "[student] model or the student stage's output", "cache": "run.dir/cache", "out": "run.dir/train",
        "seed": "[run] seed", "resume": "always: a rerun continues an interrupted training", "progress": "always shown",
        "init_adapter": "fresh adapters in the train stage; each on-policy round starts from the previous one's"}),
    "export": Section(ExportConfig, ExportConfig, wired={
        "run": "run.dir/train", "out": "run.dir/export", "checkpoint": "the finished training (final/)",
        "gguf_type": "[gguf] type (the GGUF file is a stage of its own)"}),
    "gguf": Section(GgufSection),
    "onpolicy": Section(OnPolicySection),
    "bench": Section(BenchSection, BenchConfig, wired={
        "models": "the teacher and the exported student", "out": "run.dir/bench",
        "held_out_cache": "run.dir/heldout-cache", "seed": "[run] seed",
        "system_prompt": "[generate] system_prompt (the prompt the student learnt with)",
        "trust_remote_code": _TEACHER, "progress": "always shown"},
        overrides={"task": "by default the benchmark follows the [data] source"}),
}


# Keys that moved when each section became its stage's settings: a config written before says where to.
MOVED = {f"student.{k}": f"train.{k}" for k in ("quant", "lora_r", "lora_alpha", "lora_dropout",
                                                 "gradient_checkpointing", "trust_remote_code")}


def _section(name: str):
    spec = SECTIONS[name]
    return field(default_factory=lambda: blank(spec.cls))


@dataclass
class RunConfig:
    run: RunSection = _section("run")
    teacher: TeacherSection = _section("teacher")
    data: DataSection = _section("data")
    generate: GenerateConfig = _section("generate")
    filter: FilterConfig = _section("filter")
    cache: CacheBuildConfig = _section("cache")
    student: StudentSection = _section("student")
    train: TrainConfig = _section("train")
    export: ExportConfig = _section("export")
    gguf: GgufSection = _section("gguf")
    onpolicy: OnPolicySection = _section("onpolicy")
    bench: BenchSection = _section("bench")

    def section(self, name: str) -> dict:
        """The keys of section `name` with their values (JSON-able; wired fields left out)."""
        return section_values(getattr(self, name), exclude=SECTIONS[name].wired)

    def to_dict(self) -> dict:
        return {f.name: self.section(f.name) for f in fields(self)}

    def section_hash(self, *names: str) -> str:
        """A short hash of the named sections: a stage's output is reused only while it matches.

        A section that is off (`[onpolicy] rounds = 0`) changes no output and is left out, so that the
        runs finished before it existed keep their markers."""
        names = tuple(n for n in names if not (n == "onpolicy" and self.onpolicy.rounds == 0))
        blob = json.dumps({n: self.section(n) for n in names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check(self) -> None:
        """Rules across sections (each section's own rules ran when it was read)."""
        t_train, t_cache = self.train.temperature, self.cache.temperature
        if t_train is not None and not math.isclose(t_train, t_cache, rel_tol=1e-9) and self.train.retemper_tail is None:
            raise DistillError(
                f"config key 'train.temperature' ({t_train:g}) differs from cache.temperature ({t_cache:g}): the "
                "teacher's tail can only be re-tempered approximately; leave train.temperature out (the cache's), "
                "or set train.retemper_tail = 'uniform' (recommended) or 'bucket' to accept the approximation"
            )


def config_from_dict(raw: dict, base_dir: Path | None = None) -> RunConfig:
    """Build a validated RunConfig from a parsed TOML document (unknown keys are errors)."""
    config = RunConfig()
    for name, table in raw.items():
        if name not in SECTIONS:
            raise DistillError(f"unknown config section [{name}]; known: {', '.join(SECTIONS)}")
        spec = SECTIONS[name]
        for key in table if isinstance(table, dict) else ():
            if f"{name}.{key}" in MOVED:
                raise DistillError(f"config key '{name}.{key}' moved: write it as {MOVED[f'{name}.{key}']} "
                                   f"(the [train] section takes every option of `distill train`)")
        settings_from_table(spec.cls, table, name, base_dir=base_dir, exclude=spec.wired, into=getattr(config, name))
    if base_dir is not None and not config.run.dir.is_absolute():
        config.run.dir = (base_dir / config.run.dir).resolve()
    config.check()
    return config


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config; every problem is one DistillError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise DistillError(f"config file {path} is not valid TOML: {err}") from None
    return config_from_dict(raw, base_dir=path.resolve().parent)
