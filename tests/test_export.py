"""Export: NF4 and int8 students train on the CPU, export merged and bnb-4bit, load with plain
`from_pretrained`, and give the trained model's next-token log-probs within quantization tolerance."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.errors import DistillError
from distill.models import load_model
from students.export import export_run
from students.model import StudentSpec, load_student
from students.train import TrainConfig, train


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits.float(), -1)


@pytest.fixture(scope="module")
def probe(kd_pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(kd_pair[0])
    return torch.tensor([tok.encode("Question: what is 12 + 30? 12 + 30 = 42. The answer is 42.")])


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_student_trains_exports_and_matches(kd_pair, tmp_path, probe, quant):
    _, student, cache = kd_pair
    run = tmp_path / "run"
    train(TrainConfig(student=str(student), cache=str(cache), out=str(run), quant=quant, lora_r=8, lora_alpha=16,
                      lora_dropout=0.0, lr=3e-2, steps=6, batch_size=8, eval_every=0, save_every=0, progress=False))
    spec = StudentSpec.from_dict(json.loads((run / "run.json").read_text())["student"])
    trained, _ = load_student(spec, device="cpu", adapter_dir=run / "final", trainable=False)
    lp_trained = _logprobs(trained, probe)
    full_base = load_model(str(student), what="student", quant="none", device="cpu", dtype=torch.float32)
    q_base = load_model(str(student), what="student", quant=quant, device="cpu", dtype=torch.float32)
    quant_err = (_logprobs(full_base, probe) - _logprobs(q_base, probe)).abs().max().item()
    adapter_effect = (lp_trained - _logprobs(q_base, probe)).abs().max().item()
    assert adapter_effect > 5 * quant_err  # training moved the model well beyond the tolerance used below

    merged_dir = export_run(run, tmp_path / "merged", format="merged", dtype="fp32")["out"]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert getattr(merged.config, "quantization_config", None) is None
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    lp_merged = _logprobs(merged, probe)
    assert (lp_merged - lp_trained).abs().max().item() <= 2 * quant_err + 1e-3
    # Exactly the unquantized base + adapter, folded in.
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "held-out KL" in card and str(student) in card and "forward-kl" in card

    bf16_dir = export_run(run, tmp_path / "merged-bf16", format="merged", dtype="bf16")["out"]
    bf16 = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype="auto")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert (_logprobs(bf16.float(), probe) - lp_trained).abs().max().item() <= 2 * quant_err + 2e-2

    q4_dir = export_run(run, tmp_path / "q4", format="bnb-4bit", dtype="fp32")["out"]
    q4 = AutoModelForCausalLM.from_pretrained(q4_dir)  # no quantization_config passed: read from the checkpoint
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q4.modules())
    lp_q4 = _logprobs(q4, probe)
    # NF4 export = the trained model's error (quant_err) plus a fresh NF4 rounding of the merged weights.
    nf4_base = load_model(str(student), what="student", quant="nf4", device="cpu", dtype=torch.float32)
    nf4_err = (_logprobs(full_base, probe) - _logprobs(nf4_base, probe)).abs().max().item()
    assert (lp_q4 - lp_trained).abs().max().item() <= quant_err + 2 * nf4_err + 1e-3
    assert (lp_q4.argmax(-1) == lp_trained.argmax(-1)).float().mean().item() >= 0.9


def test_export_refusals(kd_pair, tmp_path):
    with pytest.raises(DistillError, match="run.json"):
        export_run(tmp_path, tmp_path / "out")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    with pytest.raises(DistillError, match="final adapter"):
        export_run(tmp_path / "run", tmp_path / "out")
    with pytest.raises(DistillError, match="--format"):
        export_run(tmp_path / "run", tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()
