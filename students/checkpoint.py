"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint directory `checkpoints/step-XXXXXX/` holds
  adapter_model.safetensors + adapter_config.json   the LoRA adapters (peft `save_pretrained`)
  optimizer.safetensors + optimizer.json            optimizer state tensors / param groups and scalars
  scheduler.json                                    LR scheduler state
  rng.safetensors + rng.json                        torch (and CUDA), numpy and python RNG states
  rng-rank1.safetensors + rng-rank1.json, ...       the same for every other process of a multi-process run
  trainer_state.json                                step, data position (epoch, micro-batch), seed
It is built under a temporary name and renamed into place, so a run killed while saving leaves the
previous checkpoint intact and no half-written one that `--resume` could pick up.

Under N processes (`accelerate launch`) one process writes the checkpoint, with the RNG state of every
process (each draws its own dropout masks), and every process reads it back: its own RNG file, or,
when the run resumes under more processes than wrote it, keeps the seed it started from.

`torch.save` would be simpler but unpickles arbitrary code on load; a checkpoint is something users
share and download, so we keep it to data formats.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.errors import DistillError
from distill.io import fsync_dir

STEP_RE = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ---- generic nested state <-> (tensors, json) ------------------------------------------------

def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a {"__tensor__": key} reference."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"cannot serialise key {k!r}")
            # JSON keys are strings; remember int keys (optimizer state is keyed by param index).
            jk = f"__int__{k}" if isinstance(k, int) else k
            out[jk] = _split(v, f"{prefix}.{k}" if prefix else str(k), tensors)
        return out
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        key = prefix or "root"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} at {prefix!r} without pickle")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__ndarray__"}:
            return tensors[obj["__ndarray__"]].numpy()
        if set(obj) == {"__tuple__"}:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        return {(int(k[7:]) if k.startswith("__int__") else k): _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(directory: Path, name: str, state: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    _write_json(directory / f"{name}.json", skeleton)


def load_state(directory: Path, name: str) -> Any:
    skeleton = json.loads((directory / f"{name}.json").read_text())
    st = directory / f"{name}.safetensors"
    tensors = load_file(str(st)) if st.exists() else {}
    return _join(skeleton, tensors)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


# ---- RNG --------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(tuple(np_state))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---- checkpoint directories -------------------------------------------------------------------

def rng_file(rank: int) -> str:
    """The name of process `rank`'s RNG state in a checkpoint ("rng" for the first, as in one-process runs)."""
    return "rng" if rank == 0 else f"rng-rank{rank}"


def save_checkpoint(run_dir: Path, step: int, *, model, optimizer, scheduler, trainer_state: dict, keep: int = 2,
                    rng_states: list[dict] | None = None) -> Path:
    """Write checkpoints/step-XXXXXX atomically; keep the newest `keep` checkpoints (0 = all).

    `rng_states`: the RNG state of every process, rank order (None: this process's, one-process runs).
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_state(tmp, "optimizer", optimizer.state_dict())
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        save_state(tmp, "scheduler", sched)
        for rank, state in enumerate(rng_states if rng_states is not None else [rng_state()]):
            save_state(tmp, rng_file(rank), state)
        _write_json(tmp / STATE_FILE, dict(trainer_state, step=step))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory counts only once its trainer_state.json is in)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def clean_partial(run_dir: Path) -> None:
    """Remove temporary checkpoint directories left by a run killed while saving."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ckpt: Path, *, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore adapters, optimizer, scheduler and process `rank`'s RNG from `ckpt`; return its trainer state."""
    from students.model import load_adapter_weights

    ckpt = Path(ckpt)
    try:
        load_adapter_weights(model, ckpt)
        opt_state = load_state(ckpt, "optimizer")
        optimizer.load_state_dict(opt_state)
        sched_state = load_state(ckpt, "scheduler")
        cur = scheduler.state_dict()
        if "lr_lambdas" in cur:
            sched_state["lr_lambdas"] = cur["lr_lambdas"]
        scheduler.load_state_dict(sched_state)
        if (ckpt / f"{rng_file(rank)}.json").is_file():
            set_rng_state(load_state(ckpt, rng_file(rank)))
        return json.loads((ckpt / STATE_FILE).read_text())
    except DistillError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DistillError(f"checkpoint {ckpt} is unreadable ({' '.join(str(err).split())[:200]}); delete it to resume from an older one") from None


def _fsync_tree(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(directory)
