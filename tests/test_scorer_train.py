"""`distill scorer train`: a LoRA + classification head on a tiny backbone, saved where --scorer loads it."""

from __future__ import annotations

import json

import pytest

import cli
from students.scorer_train import auc


def test_auc_is_mann_whitney():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([0.5, 0.5], [0, 1]) == 0.5  # a tie counts half
    assert auc([0.2, 0.9], [1, 1]) is None


def test_scorer_train_end_to_end(tiny_model_dir, tmp_path):
    """Separable traces (right answers say 7, wrong ones 12): trained, saved, loaded by the bench's
    reward-model scorer, whose held-out scores give the AUC the trainer reported."""
    from distill.bench.scorers import make_scorers
    from distill.models.sampling import Completion
    from students.scorer_train import load_labelled, split_by_problem

    traces = tmp_path / "traces.jsonl"
    with traces.open("w") as fh:
        for p in range(10):
            q = f"Problem {p}: what is 3 + 4?"
            for s, ans in enumerate(("7", "12", "7", "12")):
                fh.write(json.dumps({"prompt_id": f"p{p}", "question": q, "gold": "7",
                                     "completion": f"3 + 4 = {ans}. The answer is {ans}."}) + "\n")
    out = tmp_path / "rm"
    with pytest.raises(SystemExit) as exc:
        cli.main(["scorer", "train", str(traces), "--base", str(tiny_model_dir), "--out", str(out), "--epochs", "4",
                  "--lr", "5e-3", "--batch-size", "8", "--held-out", "0.3"])
    assert exc.value.code in (0, None)
    summary = json.loads((out / "scorer_train.json").read_text())
    assert summary["held_out"]["problems"] == 3 and summary["held_out"]["traces"] == 12
    assert summary["losses"][-1] < summary["losses"][0]
    assert summary["held_out"]["auc"] > 0.9  # the label is in the text: a head that learned anything separates it
    # the bench loads it, and its held-out scores reproduce the reported AUC
    sset = make_scorers([f"rm={out}"])
    _, test = split_by_problem(load_labelled(traces), 0.3, 0)
    scores = []
    for r in test:
        scores.append(sset.evaluate([r["question"]], [Completion(r["completion"], 1, 0.0, True)])[1][0].weight)
    assert auc(scores, [r["label"] for r in test]) == pytest.approx(summary["held_out"]["auc"])
