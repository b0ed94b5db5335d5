"""What a model reference names, decided once, before anything is loaded.

A reference is one of:
  * "dir": a Hugging Face model directory (it holds config.json);
  * "adapter": a LoRA adapter directory (adapter_config.json, e.g. a training run's final/), whose
    base model is named inside it;
  * "gguf": a .gguf file (transformers de-quantizes it on load);
  * "hub": a hub id, `name` or `org/name` (`looks_like_hub_id`).
Each caller says which kinds it accepts. A path that does not exist and is not shaped like a hub id
fails here at once: handed to the hub client it would be retried for ~30 s on an offline machine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError

KINDS = ("dir", "adapter", "gguf", "hub")
# `name` or `org/name`: a letter or digit first, then letters, digits, `_`, `.`, `-`. Anything with
# a second separator, a leading `.`, `/` or `~`, or a space can only be a local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HINTS = {"dir": "a model directory", "adapter": "an adapter directory", "gguf": "a .gguf file",
          "hub": "a hub id (org/name)"}


def looks_like_hub_id(ref: str) -> bool:
    """True for `name` and `org/name`; the shape only, nothing is looked up."""
    return bool(HUB_ID.match(str(ref)))


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference. `path` is what a loader opens: the directory as given (`~`
    expanded), the folder of a .gguf file (with `gguf_file` its name), or the hub id."""

    ref: str
    kind: str
    path: str
    gguf_file: str | None = None
    base: str | None = None  # adapters: the base model reference written in adapter_config.json

    @property
    def location(self) -> str:
        """The one string that names the model on this machine (the file itself for a .gguf)."""
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"

    def absolute(self) -> str:
        """`location` made absolute for local models (records name the model, whatever the cwd was)."""
        return str(Path(self.location).resolve()) if self.is_local else self.location

    @property
    def tokenizer_path(self) -> str:
        """Where the tokenizer is: an adapter directory may carry its own copy, else its base has it."""
        if self.kind == "adapter":
            return self.path if (Path(self.path) / "tokenizer_config.json").is_file() else str(self.base)
        return self.path


def _hint(accept) -> str:
    names = [_HINTS[k] for k in KINDS if k in accept]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def resolve_source(ref, *, what: str = "model", accept=("dir", "hub")) -> ModelSource:
    """Resolve `ref` (a str, a Path or an already resolved ModelSource) to one of the kinds in
    `accept`; `what` names the model in the one-line errors ("teacher", "student", ...)."""
    if isinstance(ref, ModelSource):
        return ref
    unknown = [k for k in accept if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown model source kind {unknown[0]!r}; kinds are {KINDS}")
    ref = str(ref)
    hint = _hint(accept)
    p = Path(ref).expanduser()
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            if "gguf" in accept:
                return ModelSource(ref, "gguf", str(p.parent), gguf_file=p.name)
            raise DistillError(f"{what} {ref} is a .gguf file; pass {hint} "
                               "(`distill teacher import-gguf` turns a .gguf file into a model directory)")
        raise DistillError(f"{what} {ref} is a file, not a model directory; pass {hint}")
    if p.is_dir():
        if "adapter" in accept and (p / "adapter_config.json").is_file():
            try:
                base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
                if not base:
                    raise KeyError
            except (OSError, ValueError, KeyError, TypeError):
                raise DistillError(f"{what} {p}/adapter_config.json names no base_model_name_or_path") from None
            return ModelSource(ref, "adapter", str(p), base=str(base))
        if (p / "config.json").is_file():
            return ModelSource(ref, "dir", str(p))
        if (p / "adapter_config.json").is_file():
            raise DistillError(f"{what} {ref} holds a LoRA adapter (adapter_config.json), not a model; pass {hint}")
        extra = " (nor adapter_config.json)" if "adapter" in accept else ""
        raise DistillError(f"{what} {ref} has no config.json{extra}; pass {hint}")
    if "hub" in accept and looks_like_hub_id(ref):
        return ModelSource(ref, "hub", ref)
    raise DistillError(f"{what} {ref} does not exist; pass {hint}")
