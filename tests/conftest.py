"""Shared fixtures: tiny real models saved to disk, and the packaged SmolLM2 teacher when installed."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from distill.testing import save_tiny_model, tiny_tokenizer


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
