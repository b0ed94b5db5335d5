"""A build killed with SIGKILL mid-way and rerun with the same command equals an uninterrupted build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.cache.reader import CacheReader
from distill.cache.verify import verify_cache

ROOT = Path(__file__).resolve().parents[1]


def _cmd(teacher, data, out):
    return [sys.executable, "-c", "import cli; cli.main()", "cache", "build", "--teacher", str(teacher),
            "--data", str(data), "--out", str(out), "--top-k", "6", "--temperature", "1.5",
            "--max-length", "40", "--shard-size", "3", "--batch-size", "2", "--no-progress"]


def _env(delay=None):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("DISTILL_TEST_SHARD_DELAY", None)
    if delay:
        env["DISTILL_TEST_SHARD_DELAY"] = str(delay)
    return env


def _shards(path):
    m = json.loads((path / "manifest.json").read_text())
    return m, {s["file"]: load_file(path / s["file"]) for s in m["shards"]}


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(
        json.dumps({"prompt": f"Question {i}: what is {i} + {2 * i}?", "completion": f" {i} + {2 * i} = {3 * i}. The answer is {3 * i}."}) + "\n"
        for i in range(18)
    ))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(_cmd(tiny_model_dir, data, killed), cwd=ROOT, env=_env(delay=0.5),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    n_done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            n_done = len(json.loads((killed / "manifest.json").read_text())["shards"])
        except (OSError, ValueError, KeyError):
            n_done = 0
        if n_done >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    man = json.loads((killed / "manifest.json").read_text())
    assert not man["complete"] and 2 <= len(man["shards"]) < 6
    # resume with the very same command (no delay), and build a clean copy
    r = subprocess.run(_cmd(tiny_model_dir, data, killed), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    r = subprocess.run(_cmd(tiny_model_dir, data, clean), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    verify_cache(killed)
    verify_cache(clean)
    m1, s1 = _shards(killed)
    m2, s2 = _shards(clean)
    assert m1["complete"] and m2["complete"] and sorted(s1) == sorted(s2) and len(s1) == 6
    for name in s1:
        assert s1[name].keys() == s2[name].keys()
        for t in s1[name]:
            assert torch.equal(s1[name][t], s2[name][t]), (name, t)
    strip = lambda m: {k: v for k, v in m.items() if k != "build"}  # build holds wall-clock timings
    for a, b in zip(m1["shards"], m2["shards"]):
        assert a == b, {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert strip(m1) == strip(m2)
    assert not list(killed.glob("*.tmp"))
    assert len(CacheReader(killed)) == 18
