"""Selection rules and statistics on hand-made sample sets with known answers."""

from __future__ import annotations

import math

import pytest

from distill.bench.selection import (
    Sample,
    accuracy_curves,
    canonical_rules,
    is_correct,
    n_grid,
    normalise_answer,
    select_best_of_n,
    select_majority,
    select_weighted,
)
from distill.bench.stats import CalibrationBins, expected_calibration_error, wilson_interval
from distill.errors import DistillError


def S(answer, gold="7", score=0.0):
    a = normalise_answer(answer)
    return Sample(answer=a, correct=a is not None and a == normalise_answer(gold), score=score)


def test_normalise_answer_groups_equal_numbers():
    assert normalise_answer("1,000") == normalise_answer("$1000.") == normalise_answer("1000.00") == "1000"
    assert normalise_answer("0.5") == normalise_answer(".50") == "1/2"
    assert normalise_answer("12") != normalise_answer("1.2")
    assert normalise_answer(None) is None
    assert normalise_answer("  ") is None


def test_majority_picks_most_frequent_and_ties_go_to_first_seen():
    assert select_majority([S("3"), S("7"), S("7")]) == "7"
    # 3 and 7 tie with two votes each: 3 appeared first
    samples = [S("3"), S("7"), S("7"), S("3")]
    assert select_majority(samples) == "3"
    assert not is_correct("majority", samples)
    assert is_correct("majority", [S("7"), S("3"), S("3"), S("7")])


def test_unparsable_samples_do_not_vote():
    samples = [S(None), S(None), S("7")]
    assert select_majority(samples) == "7"
    assert select_best_of_n([S(None, score=0.99), S("7", score=0.1)]) == "7"
    assert select_weighted([S(None, score=5.0), S("3", score=0.2)]) == "3"


def test_no_parsable_answer_is_wrong_for_every_rule():
    samples = [S(None, score=0.9), S(None, score=0.1)]
    for rule in ("pass@n", "majority", "best-of-n", "weighted-best-of-n"):
        assert not is_correct(rule, samples), rule
    assert select_majority(samples) is None


def test_all_wrong():
    samples = [S("1", score=0.9), S("2", score=0.8), S("2", score=0.1)]
    for rule in ("pass@n", "majority", "best-of-n", "weighted-best-of-n"):
        assert not is_correct(rule, samples), rule


def test_pass_at_n_is_any_correct():
    samples = [S("1"), S("2"), S("7")]
    assert is_correct("pass@n", samples)
    assert not is_correct("majority", samples)  # all tie at one vote: '1' seen first


def test_weighted_and_unweighted_differ():
    # majority: 3 (two votes); best-of-n: 7 (0.9); weighted: 7 (0.9 > 0.1 + 0.1)
    samples = [S("3", score=0.1), S("3", score=0.1), S("7", score=0.9)]
    assert select_majority(samples) == "3"
    assert select_best_of_n(samples) == "7"
    assert select_weighted(samples) == "7"
    # best-of-n: 3 (0.5); weighted: 7 (0.3 + 0.3 = 0.6 > 0.5)
    samples = [S("3", score=0.5), S("7", score=0.3), S("7", score=0.3)]
    assert select_best_of_n(samples) == "3"
    assert select_weighted(samples) == "7"
    assert is_correct("weighted-best-of-n", samples) and not is_correct("best-of-n", samples)


def test_score_ties_are_deterministic():
    assert select_best_of_n([S("3", score=0.5), S("7", score=0.5)]) == "3"
    assert select_weighted([S("7", score=0.25), S("3", score=0.5), S("7", score=0.25)]) == "7"


def test_accuracy_curves_use_sample_prefixes():
    problems = [
        [S("3"), S("7"), S("7"), S("7")],  # maj@1 wrong, maj@2 tie -> 3 wrong, maj@4 right
        [S("7"), S("1"), S("1"), S("1")],  # maj@1 right, maj@4 wrong
    ]
    grid = n_grid(4)
    assert grid == [1, 2, 4]
    curves = accuracy_curves(problems, ["majority", "pass@n"], grid)
    assert curves["majority"] == {1: 1, 2: 1, 4: 1}
    assert curves["pass@n"] == {1: 1, 2: 2, 4: 2}
    assert n_grid(1) == [1] and n_grid(6) == [1, 2, 4, 6]


def test_canonical_rules():
    assert canonical_rules("greedy,maj,weighted") == ["greedy", "majority", "weighted-best-of-n"]
    assert canonical_rules("best-of-n, best-of-n") == ["best-of-n"]
    with pytest.raises(DistillError, match="unknown selection rule"):
        canonical_rules("greedy,oracle")
    with pytest.raises(DistillError):
        canonical_rules(" , ")


@pytest.mark.parametrize(
    "k,n,lo,hi",
    [
        (0, 10, 0.0, 0.27753),
        (10, 10, 0.72247, 1.0),
        (5, 10, 0.23659, 0.76341),
        # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (Wilson score without correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-4)
    assert got[1] == pytest.approx(hi, abs=1e-4)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_ece():
    # perfectly calibrated: conf 0.25 with 1/4 hits, conf 0.75 with 3/4 hits
    conf = [0.25] * 4 + [0.75] * 4
    hits = [1, 0, 0, 0, 1, 1, 1, 0]
    assert expected_calibration_error(conf, hits) == pytest.approx(0.0)
    # always confident 0.9, never right -> ECE 0.9
    assert expected_calibration_error([0.9] * 5, [0] * 5) == pytest.approx(0.9)
    # streaming over torch batches equals one shot
    import torch

    bins = CalibrationBins(10)
    bins.update(torch.tensor(conf[:3]), torch.tensor(hits[:3]))
    bins.update(torch.tensor(conf[3:]), torch.tensor(hits[3:]))
    assert bins.ece() == pytest.approx(0.0, abs=1e-12)
    assert bins.total == 8
    assert math.isnan(CalibrationBins().ece())
