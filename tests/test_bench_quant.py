"""Models load as deployed: forced NF4/int8, a 4-bit-saved export, and a LoRA adapter on an NF4 base."""

from __future__ import annotations

import pytest

from distill.bench import cost
from distill.bench.loading import load_for_bench
from distill.errors import DistillError


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    """hidden 64 so that NF4 blocks (64 values) fit a row on the CPU kernels."""
    from helpers import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("m64") / "m", seed=1, hidden_size=64)


def test_forced_quantization_and_honest_parameter_count(model64):
    plain = load_for_bench("p", str(model64), quant="none")
    n = cost.parameter_count(plain.model)
    assert cost.quantization_kind(plain.model) == "fp32"
    for quant in ("nf4", "int8"):
        q = load_for_bench("q", str(model64), quant=quant)
        assert cost.quantization_kind(q.model) == quant
        assert cost.parameter_count(q.model) == n  # packed 4-bit storage still counts real weights


def test_saved_4bit_model_loads_in_4bit_and_is_smaller(model64, tmp_path):
    q = load_for_bench("q", str(model64), quant="nf4")
    q.model.save_pretrained(tmp_path / "q")
    q.tokenizer.save_pretrained(tmp_path / "q")
    again = load_for_bench("q", str(tmp_path / "q"))  # --quant auto: as saved
    assert cost.quantization_kind(again.model) == "nf4"
    assert cost.size_on_disk(tmp_path / "q") < cost.size_on_disk(model64)


def test_adapter_directory_loads_on_nf4_base(model64, tmp_path):
    from students.model import StudentSpec, load_student

    student, _ = load_student(StudentSpec(path=str(model64), quant="nf4"), trainable=False)
    student.save_pretrained(tmp_path / "adapter")
    loaded = load_for_bench("s", str(tmp_path / "adapter"))
    assert loaded.source == "adapter" and loaded.base_path == str(model64)
    assert cost.quantization_kind(loaded.model) == "nf4"


def test_bench_reports_quantization(model64, tmp_path):
    from distill.bench.runner import run_bench

    res = run_bench({"s4": str(model64)}, task="synthetic", limit=2, samples=2, select="greedy,majority",
                    quant="nf4", out=tmp_path / "o", max_new_tokens=6, progress=False)
    m = res["models"][0]
    assert m["cost"]["quantization"] == "nf4"
    assert "nf4" in (tmp_path / "o" / "results.md").read_text()


def test_unknown_quant_and_bad_adapter(tmp_path):
    with pytest.raises(DistillError, match="unknown --quant"):
        load_for_bench("x", str(tmp_path), quant="q3")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(DistillError, match="base_model_name_or_path"):
        load_for_bench("x", str(tmp_path))
