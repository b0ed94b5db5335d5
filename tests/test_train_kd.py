"""KD on the cached teacher distribution beats SFT on the same tokens at matching the teacher."""

from __future__ import annotations

import pytest
import torch

from students.train import TrainConfig, read_metrics, train


@pytest.fixture(scope="module")
def pruned_pair(tmp_path_factory):
    """A peaked 4-layer tiny teacher, its 1-layer student (`student init` keep first:1) and a top-8 cache.

    The student shares the teacher's embeddings and head (as a pruned student does), so matching the
    teacher is reachable with LoRA; the ground-truth completion tokens are not the teacher's choices.
    """
    from conftest import _kd_records
    from helpers import tiny_llama, tiny_tokenizer
    from students.init_student import init_student
    from teachers.cache_build import build_cache

    root = tmp_path_factory.mktemp("pruned_pair")
    tok = tiny_tokenizer()
    teacher = tiny_llama(tok, seed=0, hidden_size=64, num_layers=4)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    init_student(root / "teacher", root / "student", keep_layers="first:1")
    build_cache(str(root / "teacher"), None, root / "cache", top_k=8, records=_kd_records(40), progress=False, log=lambda m: None)
    return root / "student", root / "cache"


def test_kd_lowers_heldout_kl_well_below_sft(pruned_pair, tmp_path):
    student, cache = pruned_pair
    common = dict(student=str(student), cache=str(cache), quant="none", lora_r=8, lora_alpha=16, lora_dropout=0.0,
                  lr=5e-3, steps=20, batch_size=8, eval_every=100, save_every=0, eval_fraction=0.2, progress=False)
    kd = train(TrainConfig(out=str(tmp_path / "kd"), kd_weight=1.0, ce_weight=0.0, **common))
    sft = train(TrainConfig(out=str(tmp_path / "sft"), kd_weight=0.0, ce_weight=1.0, **common))
    assert kd["eval_tokens"] == sft["eval_tokens"] > 0  # same held-out tokens for both
    start = [m for m in read_metrics(tmp_path / "kd") if m["kind"] == "train"][0]["kl"]
    print(f"start KL {start:.3f}; held-out KL after KD {kd['final_eval_kl']:.3f}, after SFT {sft['final_eval_kl']:.3f}; "
          f"top-1 agreement KD {kd['final_top1_agreement']:.3f}, SFT {sft['final_top1_agreement']:.3f}")
    assert kd["final_eval_kl"] < 0.5 * start
    # The step-0 evaluation is the untrained student on the same held-out tokens, for both runs.
    assert kd["initial_eval_kl"] == pytest.approx(sft["initial_eval_kl"], rel=1e-6)
    assert kd["final_eval_kl"] < 0.5 * kd["initial_eval_kl"]
    assert kd["final_eval_kl"] < 0.25 * sft["final_eval_kl"]
    assert kd["final_top1_agreement"] > sft["final_top1_agreement"] + 0.2
