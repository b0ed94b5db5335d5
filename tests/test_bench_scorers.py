"""Scorers: 'self' and a sequence-classification reward model, both mapped to [0, 1] weights."""

from __future__ import annotations

import math

import pytest

from distill.bench.scorers import RewardModelScorer, SelfScorer, make_scorer
from distill.errors import DistillError
from distill.models.sampling import Completion


def C(text, lp=-0.5):
    return Completion(text=text, num_tokens=3, mean_logprob=lp, finished=True)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    d = tmp_path_factory.mktemp("rm") / "rm"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_self_scorer_is_geometric_mean_probability():
    s = SelfScorer().score(["q", "q"], [C("a", -0.5), C("b", 0.0)])
    assert s == pytest.approx([math.exp(-0.5), 1.0])
    assert isinstance(make_scorer("self"), SelfScorer) and isinstance(make_scorer(None), SelfScorer)


def test_reward_model_scores_are_probabilities_and_batch_independent(reward_dir):
    rm = make_scorer(str(reward_dir), batch_size=3)
    assert isinstance(rm, RewardModelScorer)
    comps = [C("The answer is 7."), C("I think 12 * 5 = 60 #### 60 and more words"), C("x"), C("3 + 4 = 7")]
    batched = rm.score(["What is 3 + 4?"] * 4, comps)
    single = [RewardModelScorer(str(reward_dir), batch_size=1).score(["What is 3 + 4?"], [c])[0] for c in comps]
    assert all(0.0 < x < 1.0 for x in batched)
    assert batched == pytest.approx(single, abs=1e-5)  # padding does not change a completion's score
    assert len(set(round(x, 6) for x in batched)) > 1


def test_bench_with_reward_model(tiny_model_dir, reward_dir, tmp_path):
    from distill.bench.runner import run_bench

    res = run_bench([f"t={tiny_model_dir}"], task="synthetic", limit=2, samples=2, select="best-of-n,weighted",
                    scorer=str(reward_dir), out=tmp_path / "o", max_new_tokens=6, progress=False)
    assert res["settings"]["scorer"] == str(reward_dir)
    assert set(res["models"][0]["accuracy"]) == {"best-of-n", "weighted-best-of-n"}


def test_bad_scorer_is_one_line(tmp_path, tiny_model_dir):
    with pytest.raises(DistillError, match="does not exist"):
        make_scorer(str(tmp_path / "missing"))
    with pytest.raises(DistillError, match="has no config.json"):
        make_scorer(str(tiny_model_dir.parent))  # a directory without a model


def test_causal_lm_is_not_a_reward_model(tiny_model_dir):
    with pytest.raises(DistillError, match="not a reward model"):
        make_scorer(str(tiny_model_dir))
