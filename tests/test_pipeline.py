"""`distill run` end to end on tiny models: every stage runs, a rerun skips them all, a killed run
finishes on rerun; `distill demo --quick` runs the real SmolLM2 teacher through every stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.pipeline.config import load_config
from distill.pipeline.commands import DEMO_CONFIG, demo_config

STAGE_NAMES = ["teacher", "generate", "filter", "cache", "heldout", "student", "train", "export", "gguf", "bench"]
REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, teacher: Path, keep_layers: str = "first:1") -> Path:
    text = f"""
[run]
dir = "run"
[teacher]
model = "{teacher}"
[data]
source = "synthetic"
limit = 3
eval_limit = 2
[generate]
samples = 2
max_new_tokens = 12
batch_size = 4
[filter]
keep = "all"
[cache]
top_k = 8
max_length = 352
[student]
keep_layers = "{keep_layers}"
calibration_max_length = 512
[train]
quant = "none"
lora_r = 4
lora_alpha = 8
steps = 3
batch_size = 2
eval_every = 2
warmup_steps = 1
eval_fraction = 0.3
[export]
format = "merged"
dtype = "fp32"
[gguf]
type = "f16"
[bench]
limit = 2
samples = 2
max_new_tokens = 12
"""
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def distill_cli(*args, **kw):
    return subprocess.run([sys.executable, "-c", "import cli; cli.main()", *args], cwd=REPO,
                          capture_output=True, text=True, **kw)


def test_run_every_stage_then_skip_all(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir)
    first = distill_cli("run", str(config))
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "run"
    for name in STAGE_NAMES:
        assert (run / "stages" / f"{name}.json").is_file(), name
    results = json.loads((run / "bench" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["teacher", "student"]
    assert (run / "export" / "config.json").is_file()
    import gguf

    reader = gguf.GGUFReader(str(run / "student-f16.gguf"))  # the run ends with a llama.cpp file too
    assert reader.fields["general.architecture"].contents() == "llama"
    second = distill_cli("run", str(config))
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("complete, skipped") == len(STAGE_NAMES)


def test_killed_run_finishes_on_rerun(tmp_path, tiny_model_dir):
    # importance:1 here: with no [student] calibration the layers are measured on the run's kept traces
    config = tiny_config(tmp_path, tiny_model_dir, keep_layers="importance:1")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "run", str(config)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "stages" / "filter.json").exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "stages" / "filter.json").exists(), "the run never reached the filter stage"
    assert not (run / "stages" / "bench.json").exists()
    rerun = distill_cli("run", str(config))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "generate: complete, skipped" in rerun.stdout
    assert (run / "stages" / "bench.json").is_file()
    init = json.loads((run / "stages" / "student.json").read_text())["outputs"]["init"]
    assert init["importance"]["calibration"] == str(run / "kept.jsonl") and len(init["kept_layers"]) == 1


def test_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n")
    result = distill_cli("run", str(bad))
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines() if "kernels" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'train.stepz'")
    assert "Traceback" not in result.stderr


def test_examples_demo_matches_embedded_default():
    embedded = load_config(DEMO_CONFIG).to_dict()
    example = load_config(REPO / "examples" / "demo.toml").to_dict()
    embedded["run"].pop("dir"), example["run"].pop("dir")
    assert example == embedded


def test_gpu_example_config_is_valid():
    cfg = load_config(REPO / "examples" / "gpu-r1-qwen.toml")
    assert cfg.train.quant == "nf4" and cfg.data.source == "gsm8k"


@pytest.mark.slow
def test_demo_quick_with_real_smollm2(tmp_path):
    from conftest import require_smollm2

    require_smollm2()
    result = distill_cli("demo", "--quick", "--out", str(tmp_path / "demo"), timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| teacher |" in result.stdout and "| bench |" in result.stdout
    results = json.loads((tmp_path / "demo" / "bench" / "results.json").read_text())
    names = [m["name"] for m in results["models"]]
    assert names == ["teacher", "student"]
    assert (tmp_path / "demo" / "student-q8_0.gguf").is_file()
    cfg = demo_config(str(tmp_path / "demo"), quick=True)
    assert cfg.train.quant == "nf4"
