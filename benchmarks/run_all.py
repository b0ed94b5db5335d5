"""Run every performance benchmark of the project and write one JSON file: benchmarks/results/all.json.

    python benchmarks/run_all.py            # full sizes (minutes on a CPU; what the README figures use)
    python benchmarks/run_all.py --quick    # small sizes: a smoke run that checks every benchmark still works
    python benchmarks/run_all.py --only bench_kd_step --only bench_loss_memory

Each benchmark is a module `benchmarks/bench_*.py` with `main(argv=None) -> dict` that measures its
figures side by side in one run (ratios, because these machines are shared and noisy). This script
imports them one after another in this process, records each result (or its error: one failing
benchmark does not hide the others), and writes them with the git commit and the machine, so figures
can be compared across commits. Exit status 1 when any benchmark failed.

`--quick` passes a benchmark's small-size arguments: its module-level `QUICK_ARGS` list when it
defines one, else `--quick` when its source accepts that flag, else the sizes listed in
`QUICK_FALLBACK` below.

Never run from the test suite (benchmarks are not timed tests).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # runnable as a plain script, like each benchmark
    sys.path.insert(0, str(ROOT))

from distill.io import atomic_write_json  # noqa: E402

RESULTS = HERE / "results"

# Order: cheapest first, so a --quick run reports something useful early.
BENCHMARKS = ["bench_loss_memory", "bench_cache_build", "bench_kd_step", "bench_retemper_tail", "bench_plan", "bench_gguf",
              "bench_checkpointing", "bench_generate", "bench_cache_scaleout", "bench_train_scaleout", "bench_codecs",
              "bench_peers", "bench_importance"]

QUICK_FALLBACK: dict[str, list[str]] = {
    "bench_loss_memory": ["--rows", "2048", "--vocab", "32768", "--hidden", "128", "--k", "8", "--chunk", "256"],
    "bench_cache_build": ["--n", "4", "--repeats", "1", "--max-length", "128"],
}


def _load(name: str):
    path = HERE / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(f"benchmarks.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not callable(getattr(mod, "main", None)):
        raise AttributeError(f"{path} has no main(argv=None) -> dict")
    return mod, path


def quick_args(name: str, mod, path: Path) -> list[str]:
    if isinstance(getattr(mod, "QUICK_ARGS", None), (list, tuple)):
        return [str(a) for a in mod.QUICK_ARGS]
    if '"--quick"' in path.read_text() or "'--quick'" in path.read_text():
        return ["--quick"]
    return list(QUICK_FALLBACK.get(name, []))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        env["threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    return env


def run_all(*, quick: bool = False, only: list[str] | None = None, out: Path = RESULTS / "all.json") -> dict:
    names = only or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"error: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    report = {
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "quick": quick,
        "environment": _environment(),
        "benchmarks": {},
    }
    for name in names:
        entry: dict = {}
        t0 = time.perf_counter()
        try:
            mod, path = _load(name)
            argv = quick_args(name, mod, path) if quick else []
            entry["argv"] = argv
            print(f"== {name} {' '.join(argv)}", file=sys.stderr, flush=True)
            entry["result"] = mod.main(argv)
        except SystemExit as err:  # argparse errors inside a benchmark
            entry["error"] = f"exited with {err.code}"
        except Exception as err:  # noqa: BLE001 - record and go on to the next benchmark
            entry["error"] = f"{type(err).__name__}: {err}"
            entry["traceback"] = traceback.format_exc(limit=8)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report["benchmarks"][name] = entry
        status = "FAILED: " + entry["error"] if "error" in entry else "ok"
        print(f"== {name}: {status} ({entry['seconds']} s)", file=sys.stderr, flush=True)
        atomic_write_json(out, report, default=str)  # partial results survive a kill
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--only", action="append", default=None, metavar="NAME", help=f"run only NAME (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--out", type=Path, default=RESULTS / "all.json")
    args = p.parse_args(argv)
    report = run_all(quick=args.quick, only=args.only, out=args.out)
    failed = [n for n, e in report["benchmarks"].items() if "error" in e]
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
