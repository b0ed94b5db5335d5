"""Crash-safe file writes and the one JSONL reader every module shares.

A write goes to a temporary name in the same folder (so the rename never crosses file systems), is
fsynced, then `os.replace`d over the target and the folder is fsynced: a crash leaves the old file or
the new one, never half of one. The temporary name starts with `.` and ends with `.tmp`, so a cache
writer that sweeps `*.tmp` leftovers also sweeps these; on failure it is removed before the error
propagates. `atomic_directory` does the same for a whole saved model folder; training checkpoints keep
their own swap (they fsync every file and prune old ones).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from distill.errors import DistillError


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside `directory` durable; a no-op where folders cannot be fsynced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def is_partial_write(path: str | Path) -> bool:
    """A temporary file that `atomic_write_bytes` leaves when its process is killed mid-write
    (`.NAME.XXXX.tmp`): never part of what a directory holds, so a check that a directory is empty
    or a resume ignores it, and the writer that owns the directory sweeps it."""
    path = Path(path)
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def holds_only_partial_writes(directory: str | Path) -> bool:
    """True for a directory that is empty but for killed atomic writes' temporary files."""
    return all(is_partial_write(p) for p in Path(directory).iterdir())


def sweep_partial_writes(directory: str | Path) -> None:
    """Delete the temporary files of killed atomic writes in `directory` (its owner calls this on open)."""
    for path in Path(directory).iterdir():
        if is_partial_write(path):
            path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int = 2, **dumps_kwargs: Any) -> Path:
    """`obj` as indented JSON plus a final newline; extra keywords go to `json.dumps` (sort_keys, default)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    """One JSON object per line, UTF-8 kept readable (ensure_ascii=False)."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `out`; when the block succeeds it replaces `out` whole.

    If the block raises, the temporary folder is removed and `out` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield `(line number, object)` for each non-blank line of a JSONL file.

    The line number lets callers name `file:line` in their own errors (a missing field). A line that is
    not JSON, not UTF-8 or not an object, or a file that cannot be read, raises a one-line DistillError
    naming the file and line.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise DistillError(f"{path}:{lineno} is not UTF-8 text; save the file as UTF-8") from None
                except json.JSONDecodeError as err:
                    raise DistillError(f"{path}:{lineno} is not valid JSON ({err.msg}); "
                                       "each line must be one JSON object") from None
                if not isinstance(row, dict):
                    raise DistillError(f"{path}:{lineno} is not a JSON object")
                yield lineno, row
    except OSError as err:
        raise DistillError(f"cannot read {path}: {err.strerror or err}") from None
