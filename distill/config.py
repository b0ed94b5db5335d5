"""One TOML file describes a whole run: teacher, data, generation, filter, cache, student, training,
export (and an optional GGUF file) and benchmark. `load_config` validates it up front, so that a typo fails in one line naming
the key before an hour of teacher generation, not after.

Each section is a dataclass; its fields are the keys a user may write, with their defaults. Relative
paths are resolved against the config file's folder, so that a config travels with its data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import DistillError


@dataclass
class RunSection:
    dir: str = "runs/distill"  # every stage writes under this folder
    seed: int = 0


@dataclass
class TeacherSection:
    model: str = "smollm2"  # a local model dir, a hub id, or "smollm2" (the packaged GGUF)
    gguf: str = ""  # a GGUF file to import as the teacher (overrides `model`)
    trust_remote_code: bool = False
    quant: str = "none"  # none | nf4 | int8: load a teacher larger than the GPU


@dataclass
class DataSection:
    source: str = "synthetic"  # synthetic | gsm8k | path to a JSONL of question/answer records
    split: str = "train"
    limit: int = 64  # problems used for traces (0 = all)
    eval_limit: int = 32  # held-out problems for the benchmark (test split, or fresh synthetic ones)
    path: str = ""  # local copy of GSM8K (a folder with train.jsonl/test.jsonl); empty = the hub


@dataclass
class GenerateSection:
    samples: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    batch_size: int = 16
    system_prompt: str = ""  # empty = the default reasoning prompt (<think>...</think>, then the answer)


@dataclass
class FilterSection:
    keep: str = "all-correct"  # all-correct | best | first-correct | all (no filtering)
    require_format: bool = False  # also require well-formed <think>...</think>


@dataclass
class CacheSection:
    top_k: int = 64
    temperature: float = 1.0
    max_length: int = 512
    dtype: str = "bf16"  # fp16 | bf16
    batch_size: int = 8


@dataclass
class StudentSection:
    model: str = ""  # a local dir or hub id; empty = made from the teacher by keeping layers
    keep_layers: str = "every:2"
    quant: str = "nf4"  # nf4 | int8 | none
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = True  # off trades memory for ~1/3 less compute (fine on CPU)
    trust_remote_code: bool = False


@dataclass
class TrainSection:
    loss: str = "forward-kl"  # forward-kl | forward-kl-renorm | reverse-kl | jsd
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    steps: int = 100
    epochs: float = 0.0  # > 0 overrides steps
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 5
    eval_every: int = 25
    eval_fraction: float = 0.1


@dataclass
class ExportSection:
    format: str = "merged"  # merged | bnb-4bit
    dtype: str = "bf16"


@dataclass
class GgufSection:
    type: str = ""  # f16 | q8_0 | q4_0 (| f32): also write the student as one GGUF file for llama.cpp; empty = no


@dataclass
class BenchSection:
    enabled: bool = True
    task: str = ""  # empty = the data section's source
    limit: int = 32
    samples: int = 4
    select: str = "greedy,majority,best-of-n,weighted-best-of-n"
    max_new_tokens: int = 256


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: DataSection = field(default_factory=DataSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    filter: FilterSection = field(default_factory=FilterSection)
    cache: CacheSection = field(default_factory=CacheSection)
    student: StudentSection = field(default_factory=StudentSection)
    train: TrainSection = field(default_factory=TrainSection)
    export: ExportSection = field(default_factory=ExportSection)
    gguf: GgufSection = field(default_factory=GgufSection)
    bench: BenchSection = field(default_factory=BenchSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """A short hash of the named sections: a stage's output is reused only while it matches."""
        blob = json.dumps({n: dataclasses.asdict(getattr(self, n)) for n in names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Values a key may take, checked at load time so that a typo fails before any work starts.
CHOICES = {
    "teacher.quant": {"none", "nf4", "int8"},
    "filter.keep": {"all-correct", "best", "first-correct", "all"},
    "cache.dtype": {"fp16", "bf16"},
    "student.quant": {"nf4", "int8", "none"},
    "train.loss": {"forward-kl", "forward-kl-renorm", "reverse-kl", "jsd"},
    "export.format": {"merged", "bnb-4bit"},
    "export.dtype": {"bf16", "fp16", "fp32"},
    "gguf.type": {"", "f32", "f16", "q8_0", "q4_0"},
}
POSITIVE = {
    "data.eval_limit", "generate.samples", "generate.max_new_tokens", "generate.batch_size",
    "cache.top_k", "cache.max_length", "cache.batch_size", "cache.temperature", "student.lora_r",
    "train.temperature", "train.batch_size", "train.grad_accum", "train.lr", "bench.limit",
    "bench.samples", "bench.max_new_tokens",
}
PATH_KEYS = {"run.dir", "teacher.gguf", "data.path"}


def _coerce(key: str, value, annotation: str):
    """Check one value against its field's type; ints are accepted where floats are expected."""
    expected = {"str": str, "int": int, "float": float, "bool": bool}[annotation]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise DistillError(f"config key '{key}' must be {annotation}, got {type(value).__name__} {value!r}")
    return value


def config_from_dict(raw: dict, base_dir: Path | None = None) -> RunConfig:
    """Build a validated RunConfig from a parsed TOML document (unknown keys are errors)."""
    config = RunConfig()
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    for section_name, table in raw.items():
        if section_name not in sections:
            raise DistillError(f"unknown config section [{section_name}]; known: {', '.join(sections)}")
        if not isinstance(table, dict):
            raise DistillError(f"config entry '{section_name}' must be a [section] table")
        section = getattr(config, section_name)
        hints = typing.get_type_hints(type(section))
        known = {f.name for f in dataclasses.fields(section)}
        for key, value in table.items():
            full = f"{section_name}.{key}"
            if key not in known:
                raise DistillError(f"unknown config key '{full}'; [{section_name}] takes: {', '.join(sorted(known))}")
            value = _coerce(full, value, hints[key].__name__)
            if full in CHOICES and value not in CHOICES[full]:
                raise DistillError(f"config key '{full}' must be one of {sorted(CHOICES[full])}, got {value!r}")
            if full in POSITIVE and value <= 0:
                raise DistillError(f"config key '{full}' must be > 0, got {value!r}")
            if full in PATH_KEYS and value and base_dir is not None and not Path(value).is_absolute():
                value = str((base_dir / value).resolve())
            setattr(section, key, value)
    for key, value in (("data.limit", config.data.limit), ("train.steps", config.train.steps)):
        if value < 0:
            raise DistillError(f"config key '{key}' must be >= 0, got {value}")
    if not 0.0 < config.train.eval_fraction < 1.0:
        raise DistillError(f"config key 'train.eval_fraction' must be between 0 and 1, got {config.train.eval_fraction}")
    if config.train.kd_weight < 0 or config.train.ce_weight < 0 or config.train.kd_weight + config.train.ce_weight == 0:
        raise DistillError("config keys 'train.kd_weight' and 'train.ce_weight' must be >= 0 and not both 0")
    if base_dir is not None and not Path(config.run.dir).is_absolute():
        config.run.dir = str((base_dir / config.run.dir).resolve())
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
