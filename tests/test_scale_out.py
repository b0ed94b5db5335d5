"""Several processes under `accelerate launch` build the cache (and generate traces) that one process does.

The processes are real: `accelerate launch --multi_gpu --num_processes 2` starts them through torchrun
and, on a machine without GPUs (or with `--device cpu`), they form a gloo group on the CPU. (accelerate's
`--cpu` flag starts one process unless MPI is set up, so it is not what these tests use.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.cache.reader import CacheReader
from distill.cache.verify import verify_cache
from distill.ranks import Ranks, gpus_for_local_rank
from teachers.cache_build import build_cache

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"prompt": f"Question {i}: what is {i} + {2 * i}?", "completion": f" {i} + {2 * i} = {3 * i}. The answer is {3 * i}."}
    for i in range(22)
]
BUILD = ["--top-k", "6", "--temperature", "1.5", "--max-length", "40", "--shard-size", "3", "--batch-size", "2",
         "--device", "cpu", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(delay=None) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DISTILL_TEST_SHARD_DELAY", None)
    if delay:
        env["DISTILL_TEST_SHARD_DELAY"] = str(delay)
    return env


def launch_script(nproc: int, script: Path, *args: str) -> list[str]:
    """`python SCRIPT ARGS` as N processes under accelerate launch (1: a plain process, no launcher)."""
    if nproc == 1:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), str(script), *args]


def launch_cmd(nproc: int, *args: str) -> list[str]:
    """`distill ARGS` as N processes."""
    return launch_script(nproc, ROOT / "cli.py", *args)


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in their own sessions,
    so killing the launcher's process group alone would leave them running)."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in [psutil.Process(pid), *procs] if psutil.pid_exists(pid) else procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run_distill(nproc: int, *args: str, timeout: float = 600, delay=None) -> subprocess.CompletedProcess:
    """Run to the end; on a timeout kill the whole process group (the launcher and its workers)."""
    proc = subprocess.Popen(launch_cmd(nproc, *args), cwd=ROOT, env=_env(delay), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"distill {' '.join(args)} on {nproc} processes timed out:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _data(tmp_path: Path, records=RECORDS) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def assert_same_samples(a: Path, b: Path) -> None:
    """Two caches hold, sample by sample, the same ids, mask, top-k ids and log-probs."""
    ra, rb = CacheReader(a), CacheReader(b)
    assert len(ra) == len(rb)
    for i in range(len(ra)):
        x, y = ra[i], rb[i]
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), (i, key)
    ma, mb = ra.manifest, rb.manifest
    strip = lambda d, key: {k: v for k, v in d.items() if k != key}  # noqa: E731
    assert strip(ma.teacher, "name_or_path") == strip(mb.teacher, "name_or_path")
    assert ma.data["fingerprint"] == mb.data["fingerprint"]
    for name in ("tokenizer_fingerprint", "k", "temperature", "value_dtype", "id_dtype", "num_samples", "pad_id"):
        assert getattr(ma, name) == getattr(mb, name), name


def _no_leftovers(cache: Path) -> None:
    assert not list(cache.glob("progress-*")) and not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))


@pytest.fixture(scope="module")
def one_process_cache(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("one")
    data = _data(tmp)
    result = run_distill(1, "cache", "build", "--teacher", str(tiny_model_dir), "--data", str(data),
                         "--out", str(tmp / "cache"), *BUILD)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "cache"


def test_two_processes_build_the_one_process_cache(tmp_path, tiny_model_dir, one_process_cache):
    out = tmp_path / "two"
    result = run_distill(2, "cache", "build", "--teacher", str(tiny_model_dir), "--data", str(_data(tmp_path)),
                         "--out", str(out), *BUILD)
    assert result.returncode == 0, result.stderr[-3000:]
    verify_cache(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["build"]["processes"] == 2
    ranks = {s["rank"] for s in manifest["shards"]}
    assert ranks == {0, 1}, "both processes wrote shards"
    for s in manifest["shards"]:  # shard j went to rank j % 2, under its rank's name
        assert s["rank"] == s["index"] % 2 and s["file"] == f"shard-r{s['rank']:02d}-{s['index']:05d}.safetensors"
    _no_leftovers(out)
    assert_same_samples(out, one_process_cache)
    # same bytes per shard as well: the content does not depend on the process that computed it
    one = {s["index"]: s["sha256"] for s in json.loads((one_process_cache / "manifest.json").read_text())["shards"]}
    assert {s["index"]: s["sha256"] for s in manifest["shards"]} == one


def _committed(cache: Path) -> int:
    """Shards listed by the manifest or by a progress file (what a killed build keeps)."""
    found = set()
    for path in [cache / "manifest.json", *cache.glob("progress-r*.json")]:
        try:
            found |= {s["index"] for s in json.loads(path.read_text())["shards"]}
        except (OSError, ValueError, KeyError):
            pass
    return len(found)


def test_two_processes_killed_then_resumed_by_one(tmp_path, tiny_model_dir, one_process_cache):
    data, out = _data(tmp_path), tmp_path / "killed"
    args = ["cache", "build", "--teacher", str(tiny_model_dir), "--data", str(data), "--out", str(out), *BUILD]
    proc = subprocess.Popen(launch_cmd(2, *args), cwd=ROOT, env=_env(delay=1.0), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and _committed(out) < 3:
            time.sleep(0.05)
        assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read()[-2000:]}"
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert 3 <= _committed(out) < 8
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    result = run_distill(1, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr
    verify_cache(out)
    _no_leftovers(out)
    assert_same_samples(out, one_process_cache)


def test_device_map_auto_builds_the_same_cache(tmp_path, tiny_model_dir, one_process_cache):
    out = tmp_path / "mapped"
    build_cache(str(tiny_model_dir), _data(tmp_path), out, top_k=6, temperature=1.5, max_length=40, shard_size=3,
                batch_size=2, device="cpu", device_map="auto", progress=False, log=lambda m: None)
    verify_cache(out)
    assert_same_samples(out, one_process_cache)
    assert json.loads((out / "manifest.json").read_text())["build"]["device_map"]["asked"] == "auto"


def test_work_is_dealt_round_robin_and_gpus_in_blocks():
    assert [Ranks(rank=r, world=3).take(list(range(8))) for r in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert Ranks().take([1, 2]) == [1, 2]
    assert [gpus_for_local_rank(r, 2, 8) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [gpus_for_local_rank(r, 3, 8) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert gpus_for_local_rank(0, 1, 4) == [0, 1, 2, 3]
    from distill.errors import DistillError

    with pytest.raises(DistillError, match="needs at least 4 GPUs"):
        gpus_for_local_rank(0, 4, 2)


GENERATE = ["--data", "synthetic:5", "--samples", "2", "--temperature", "1.0", "--max-new-tokens", "10",
            "--batch-size", "2", "--seed", "3", "--device", "cpu"]


def test_two_processes_write_the_one_process_traces_file(tmp_path, tiny_model_dir):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    for nproc, out in ((1, one), (2, two)):
        result = run_distill(nproc, "teacher", "generate", "--teacher", str(tiny_model_dir), *GENERATE, "--out", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes() and one.read_bytes().count(b"\n") == 10
    assert not list(tmp_path.glob("*.part-*"))
    # a killed multi-process run leaves part files; the rerun (any number of processes) folds them in
    lines = one.read_bytes().splitlines(keepends=True)
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_bytes(b"".join(lines[:2]))
    (tmp_path / "resumed.jsonl.part-r01").write_bytes(lines[6] + lines[7] + lines[2][:30])  # + half a line
    result = run_distill(1, "teacher", "generate", "--teacher", str(tiny_model_dir), *GENERATE, "--out", str(resumed))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 6 traces (4 already done)" in result.stdout
    assert sorted(resumed.read_bytes().splitlines()) == sorted(one.read_bytes().splitlines())
    assert not list(tmp_path.glob("*.part-*"))


DRIVER = """
import atexit
import os
import sys

import torch.distributed

# Registered before the stages form the group, so it runs after distill's own exit handler (LIFO).
# One os.write per line: both ranks share the pipe, and a write this short is atomic there, while
# print() writes its arguments piecewise and two ranks' lines can interleave.
atexit.register(
    lambda: os.write(1, f"group alive at exit: {torch.distributed.is_initialized()}\\n".encode())
)
from distill.pipeline.config import load_config
from distill.pipeline.runner import run_stages
from distill.pipeline.stages import STAGES

config = load_config(sys.argv[1])
config.run.dir = sys.argv[2]
run_stages(config, [s for s in STAGES if s.name in sys.argv[3].split(",")])
"""


def _sharp_teacher(directory: Path) -> Path:
    """The tiny teacher with its weights x8: peaked distributions whose second layer matters (a student cut
    to its first layer starts at KL ~0.3 instead of ~1e-6, where gradients would be at rounding level and
    Adam would turn the rounding of a 2-process split into differences of a fraction of lr)."""
    from helpers import save_tiny_model
    from transformers import AutoModelForCausalLM

    save_tiny_model(directory, seed=0)
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8)
    model.save_pretrained(directory)
    return directory


def test_pipeline_stages_on_two_processes_equal_one(tmp_path, tiny_model_dir):
    """The rank-aware stage runner: the stages up to training, on 2 processes and on 1, give the same files,
    the same logged training losses and the same adapters."""
    from test_pipeline import tiny_config
    from test_train_multiprocess import _assert_same_training, _assert_written_once

    config = tiny_config(tmp_path, _sharp_teacher(tmp_path / "sharp-teacher"))
    text = config.read_text().replace("steps = 3", "steps = 5\nlora_dropout = 0.0")  # >= 5 steps; dropout draws differ per process
    config.write_text(text)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    names = "teacher,generate,filter,cache,heldout,student,train"
    runs = {}
    for nproc in (1, 2):
        run = tmp_path / f"run{nproc}"
        cmd = launch_script(nproc, driver, str(config), str(run), names)
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("heldout: done") == 1  # one process speaks
        runs[nproc] = run
    one, two = runs[1], runs[2]
    for name in ("traces.jsonl", "kept.jsonl", "heldout.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    for cache in ("cache", "heldout-cache"):
        verify_cache(two / cache)
        assert_same_samples(two / cache, one / cache)
        _no_leftovers(two / cache)
    assert sorted(p.name for p in (two / "stages").iterdir()) == sorted(f"{n}.json" for n in names.split(","))
    _assert_written_once(two / "train")
    _assert_same_training(one / "train", two / "train")
    again = subprocess.run(launch_script(2, driver, str(config), str(two), names), cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 7, again.stderr[-3000:]
    # each process destroyed its group before Python shut down (a live gloo group can abort the exit)
    assert again.stdout.count("group alive at exit: False") == 2, again.stdout[-2000:]


def test_bench_on_two_processes_equals_one(tmp_path, tiny_model_dir):
    """The benchmark's batches dealt over 2 processes give the completions and accuracies of 1 process."""
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"bench{nproc}"
        r = run_distill(nproc, "bench", "--model", f"t={tiny_model_dir}", "--task", "synthetic", "--limit", "5",
                        "--samples", "3", "--max-new-tokens", "8", "--batch-size", "2", "--no-progress",
                        "--out", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        results[nproc] = json.loads((out / "results.json").read_text())
        assert r.stdout.count("results.json") <= 1  # one process prints the summary
    assert (tmp_path / "bench2" / "samples.jsonl").read_bytes() == (tmp_path / "bench1" / "samples.jsonl").read_bytes()
    one, two = results[1]["models"][0], results[2]["models"][0]
    assert two["accuracy"] == one["accuracy"] and two["curves"] == one["curves"]
    assert two["cost"]["generated_tokens"] == one["cost"]["generated_tokens"] and two["cost"]["processes"] == 2
