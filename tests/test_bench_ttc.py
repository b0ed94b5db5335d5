"""Test-time compute: several scorers combined, the teacher as verifier, token accounting."""

from __future__ import annotations

import json
import math

import pytest

from distill.bench.scorers import ScorerSpec, make_scorers, parse_scorer_specs
from distill.bench.selection import Sample, select_best_of_n, select_weighted
from distill.errors import DistillError
from distill.models.sampling import Completion

SYSTEM = "Solve it."


def C(text, lp=-0.5, n=3):
    return Completion(text=text, num_tokens=n, mean_logprob=lp, finished=True)


def test_scorer_specs_grammar():
    specs = parse_scorer_specs(["self:0.5", "teacher=/m/t", "teacher-sum=/m/t:2", "rm=/m/rm:0", "/m/other"])
    assert specs == [ScorerSpec("self", "self", None, 0.5), ScorerSpec("teacher", "teacher", "/m/t", 1.0),
                     ScorerSpec("teacher-sum", "teacher-sum", "/m/t", 2.0), ScorerSpec("rm", "reward-model", "/m/rm", 0.0),
                     ScorerSpec("/m/other", "reward-model", "/m/other", 1.0)]
    assert specs[1].cost_key == specs[2].cost_key != specs[3].cost_key  # mean and sum share one prefill
    assert parse_scorer_specs("self") == [ScorerSpec("self", "self", None, 1.0)]
    for bad, msg in ((["self", "self:2"], "given twice"), (["self:0"], "at least one"), (["=x"], "malformed"),
                     (["self:-1"], "finite number >= 0"), ([""], "empty")):
        with pytest.raises(DistillError, match=msg):
            parse_scorer_specs(bad)


def test_bad_scorer_fails_before_any_model_loads(tmp_path):
    from distill.bench.runner import run_bench

    with pytest.raises(DistillError, match="given twice"):
        run_bench(["m=/nonexistent"], out=tmp_path / "o", samples=2, scorer=["a=self", "a=self:2"])


def _dense_logprobs(model_dir, question, text):
    """The reference: one plain forward of prompt + completion, log_softmax, the completion's tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.models.sampling import format_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    p = tok(format_prompt(tok, question, SYSTEM), add_special_tokens=False)["input_ids"]
    c = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + c])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(p) - 1:len(p) + len(c) - 1].gather(1, torch.tensor(c)[:, None])[:, 0]
    return len(p), c, lp.tolist()


def test_teacher_logprobs_equal_a_dense_forward(tiny_model_dir):
    """Batched (padded, rows of several lengths) prefills through the backend = one dense forward each."""
    from distill.bench.verifier import TeacherLogprobs

    pairs = [("What is 3 + 4?", "3 + 4 = 7. The answer is 7."), ("Sara reads 20 pages.", "120 pages"),
             ("What is 3 + 4?", "The answer is 12."), ("Ten pens cost $20.", "")]
    verifier = TeacherLogprobs(str(tiny_model_dir), system_prompt=SYSTEM, batch_size=3)
    got = verifier.score([q for q, _ in pairs], [t for _, t in pairs])
    for (q, t), g in zip(pairs, got):
        if not t:
            assert g.ids == () and g.mean == float("-inf") and g.sum == 0.0
            continue
        plen, ids, ref = _dense_logprobs(tiny_model_dir, q, t)
        assert g.prompt_tokens == plen and list(g.ids) == ids and g.tokens == plen + len(ids)
        assert g.logprobs == pytest.approx(ref, abs=1e-4)
        assert g.sum == pytest.approx(sum(ref), abs=1e-3) and g.mean == pytest.approx(sum(ref) / len(ref), abs=1e-4)
        assert "".join(t[a:b] for a, b in g.offsets) == t  # offsets cover the text: steps map to tokens


def test_scorer_weights_decide_the_winner(tiny_model_dir):
    """Hand-made candidates: `self` prefers answer 7, the teacher prefers the other text; the weights
    of the combination decide, and the combined weight is exactly sum_k WEIGHT_k * weight_k."""
    texts = ["3 + 4 = 7. The answer is 7.", "The answer is 12."]
    q = ["What is 3 + 4?"] * 2
    probe = make_scorers(["teacher=" + str(tiny_model_dir)], system_prompt=SYSTEM)
    t_w = [s.weight for s in probe.evaluate(q, [C(t) for t in texts])[1]]
    assert t_w[0] != t_w[1]
    teacher_pick = 0 if t_w[0] > t_w[1] else 1
    # self's weights, by hand: the opposite preference, by a margin the weights can overturn
    lps = [-0.1, -2.0] if teacher_pick == 1 else [-2.0, -0.1]
    comps = [C(t, lp) for t, lp in zip(texts, lps)]
    answers = ["7", "12"]
    picks = {}
    # the exchange rate at which the two preferences balance: 10x past it the teacher wins, 10x short self does
    rate = abs(math.exp(lps[0]) - math.exp(lps[1])) / abs(t_w[0] - t_w[1])
    big, small = 10 * rate, 0.1 * rate
    for ws, wt in ((1.0, 0.0), (0.0, 1.0), (1.0, big), (1.0, small)):
        sset = make_scorers([f"self:{ws}", f"teacher={tiny_model_dir}:{wt}"], system_prompt=SYSTEM)
        each, combined = sset.evaluate(q, comps)
        for i in range(2):
            assert combined[i].weight == pytest.approx(ws * math.exp(lps[i]) + wt * each["teacher"][i].weight)
            assert combined[i].tokens == each["teacher"][i].tokens > 0 and each["self"][i].tokens == 0
        samples = [Sample(a, a == "7", s.weight) for a, s in zip(answers, combined)]
        picks[(ws, wt)] = (select_best_of_n(samples), select_weighted(samples))
    self_pick = answers[1 - teacher_pick]
    assert picks[(1.0, 0.0)] == (self_pick, self_pick) and picks[(1.0, small)] == (self_pick, self_pick)
    assert picks[(0.0, 1.0)] == (answers[teacher_pick],) * 2 and picks[(1.0, big)] == (answers[teacher_pick],) * 2


def test_weighted_sum_over_samples_and_scorers():
    """Weighted best-of-N over samples: two weak votes for one answer beat one strong vote, or not,
    as the scorer weights say (hand-made weights: only the sums matter)."""
    strong_a = [Sample("a", True, 0.9), Sample("b", False, 0.5), Sample("b", False, 0.5)]
    assert select_best_of_n(strong_a) == "a" and select_weighted(strong_a) == "b"


def test_teacher_sum_is_relative_likelihood(tiny_model_dir):
    sset = make_scorers([f"teacher-sum={tiny_model_dir}", f"teacher={tiny_model_dir}:0"], system_prompt=SYSTEM)
    texts = ["3 + 4 = 7. The answer is 7.", "The answer is 12.", "7"]
    each, _ = sset.evaluate(["What is 3 + 4?"] * 3, [C(t) for t in texts])
    sums = [s.extra["teacher_sum_logprob"] for s in each["teacher-sum"]]
    assert [s.weight for s in each["teacher-sum"]] == pytest.approx([math.exp(x - max(sums)) for x in sums])
    assert max(s.weight for s in each["teacher-sum"]) == 1.0
    means = [s.extra["teacher_mean_logprob"] for s in each["teacher"]]
    assert [s.weight for s in each["teacher"]] == pytest.approx([math.exp(m) for m in means])
    assert len(sset._shared) == 1  # one teacher loaded for both


def test_bench_with_two_scorers_reports_each_and_the_tokens(tiny_model_dir, tiny_student_dir, tmp_path):
    """End to end: the combination and each scorer's own columns, token costs per rule that can be
    recounted from samples.jsonl, and the accuracy-vs-tokens JSON and PNG."""
    from distill.bench.runner import run_bench
    from distill.bench.selection import is_correct, normalise_answer

    out = tmp_path / "o"
    res = run_bench([f"s={tiny_student_dir}"], task="synthetic", limit=3, samples=2, out=out, max_new_tokens=8,
                    scorer=["self:1", f"teacher={tiny_model_dir}:2"], select="greedy,majority,best-of-n,weighted",
                    progress=False, batch_size=4)
    m = res["models"][0]
    keys = ["greedy", "majority", "best-of-n", "weighted-best-of-n", "best-of-n[self]", "weighted-best-of-n[self]",
            "best-of-n[teacher]", "weighted-best-of-n[teacher]"]
    assert res["settings"]["columns"] == keys and set(m["accuracy"]) == set(keys)
    records = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    samples = [r for r in records if r["kind"] == "sample"]
    greedy = [r for r in records if r["kind"] == "greedy"]
    by_id: dict = {}
    for r in samples:
        by_id.setdefault(r["id"], []).append(r)
        assert r["score"] == pytest.approx(r["scores"]["self"]["weight"] + 2 * r["scores"]["teacher"]["weight"])
        assert r["scorer_tokens"] == r["scores"]["teacher"]["tokens"] > r["scores"]["teacher"]["teacher_tokens"]
    for key in keys[2:]:
        rule, _, who = key.partition("[")
        who = who.rstrip("]")
        rows = [[Sample(normalise_answer(r["answer"]), r["correct"], r["scores"][who]["weight"] if who else r["score"])
                 for r in v] for v in by_id.values()]
        assert sum(is_correct(rule, v) for v in rows) == m["accuracy"][key]["correct"]
    # token accounting: recount from the records
    comp = m["compute"]
    assert comp["greedy"][0]["generated_tokens"] == pytest.approx(sum(r["num_tokens"] for r in greedy) / 3)
    gen2 = sum(r["num_tokens"] for r in samples) / 3
    teacher2 = sum(r["scores"]["teacher"]["tokens"] for r in samples) / 3
    assert [p["samples"] for p in comp["majority"]] == [1, 2] and comp["majority"][0]["n"] == 3
    assert comp["majority"][1]["generated_tokens"] == pytest.approx(gen2) and comp["majority"][1]["scorer_tokens"] == 0
    for key in ("best-of-n", "best-of-n[teacher]"):
        assert comp[key][1]["scorer_tokens"] == pytest.approx(teacher2)
        assert comp[key][1]["total_tokens"] == pytest.approx(gen2 + teacher2)
    assert comp["best-of-n[self]"][1]["scorer_tokens"] == 0
    first = [v[0] for v in by_id.values()]
    assert comp["best-of-n"][0]["scorer_tokens"] == pytest.approx(sum(r["scores"]["teacher"]["tokens"] for r in first) / 3)
    curves = json.loads((out / "accuracy_vs_tokens.json").read_text())
    assert curves["curves"]["s"] == comp
    assert (out / "accuracy_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "best-of-2[teacher]" in md and "Accuracy at equal compute" in md


def test_split_steps_modes():
    from distill.bench.steps import split_steps

    def parts(text, mode):
        spans = split_steps(text, mode)
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # the steps tile the text
        return [text[a:b] for a, b in spans]

    lines = "3 + 4 = 7\n\n7 * 2 = 14\nThe answer is 14."
    assert parts(lines, "lines") == ["3 + 4 = 7\n\n", "7 * 2 = 14\n", "The answer is 14."]
    stepk = "Let me see.\nStep 1: add 3 + 4 = 7.\nso 7\nStep 2: double, 14.\nThe answer is 14."
    assert parts(stepk, "step-k") == ["Let me see.\n", "Step 1: add 3 + 4 = 7.\nso 7\n", "Step 2: double, 14.\nThe answer is 14."]
    assert parts(stepk, "auto") == parts(stepk, "step-k")
    think = "<think>First, 3 + 4 = 7.\n\nThen 7 * 2\n= 14.\n\n</think>\nThe answer is 14."
    assert parts(think, "paragraphs") == ["<think>First, 3 + 4 = 7.\n\n", "Then 7 * 2\n= 14.\n\n", "</think>\nThe answer is 14."]
    assert parts(think, "auto") == parts(think, "paragraphs")
    assert parts("one line", "auto") == ["one line"] and split_steps("", "lines") == []


def test_aggregates():
    from distill.bench.steps import aggregate

    assert aggregate([0.9, 0.5, 0.8], "min") == 0.5
    assert aggregate([0.9, 0.5, 0.8], "product") == pytest.approx(0.36)
    assert aggregate([0.9, 0.5, 0.8], "last") == 0.8
    assert aggregate([], "min") == 0.0


def test_teacher_step_scores_equal_dense_per_step_means(tiny_model_dir):
    """Per-step scores from the one prefill = exp(mean of the dense log-probs of each step's tokens),
    the tokens assigned to steps by their first character (recomputed here by tokenizing each prefix)."""
    from transformers import AutoTokenizer

    from distill.bench.steps import split_steps

    q, text = "What is 3 + 4?", "3 + 4 = 7\nso 7 * 2 = 14\nThe answer is 14."
    spans = split_steps(text, "lines")
    assert len(spans) == 3
    plen, ids, ref = _dense_logprobs(tiny_model_dir, q, text)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # tokens of step k = tokens of prefix k minus tokens of prefix k-1 (lines end in "\n": no merge across)
    counts = [len(tok(text[:b], add_special_tokens=False)["input_ids"]) for _, b in spans]
    bounds = [0] + counts
    want = [math.exp(sum(ref[a:b]) / (b - a)) for a, b in zip(bounds, bounds[1:])]
    for how, agg in (("min", min(want)), ("product", math.prod(want)), ("last", want[-1])):
        sset = make_scorers([f"teacher-steps={tiny_model_dir}"], system_prompt=SYSTEM, steps="lines", step_aggregate=how)
        each, combined = sset.evaluate([q], [C(text)])
        got = each["teacher-steps"][0]
        assert got.extra["step_scores"] == pytest.approx(want, rel=1e-4)
        assert combined[0].weight == pytest.approx(agg, rel=1e-4) and combined[0].tokens == plen + len(ids)


@pytest.fixture(scope="module")
def search_setup(tiny_model_dir, tiny_student_dir):
    from transformers import AutoTokenizer

    from distill.bench.runner import step_spec
    from distill.bench.scorers import make_step_scorer
    from distill.models import load_model, load_tokenizer, resolve_source
    from distill.models.sampling import format_prompt

    src = resolve_source(str(tiny_student_dir))
    model, tok = load_model(src), load_tokenizer(src)
    value = make_step_scorer(step_spec(f"teacher={tiny_model_dir}"), system_prompt=SYSTEM)
    q = "What is 3 + 4?"
    t_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    t_prompt = len(t_tok(format_prompt(t_tok, q, SYSTEM), add_special_tokens=False)["input_ids"])
    return model, tok, value, q, format_prompt(tok, q, SYSTEM), t_tok, t_prompt


def _check_scored_tokens(res, t_tok, t_prompt):
    """Scorer tokens recomputed from the scored texts with the teacher's tokenizer, one prefill each."""
    scored = [e for e in res.log if e[0] == "score"]
    assert res.scorer_tokens == sum(t_prompt + len(t_tok(text, add_special_tokens=False)["input_ids"])
                                    for _, text, _ in scored)
    return scored


def test_beam_search_counts_every_token(search_setup):
    from distill.bench.search import SearchSettings, beam_search

    model, tok, value, q, prompt, t_tok, t_prompt = search_setup
    st = SearchSettings.from_bench(beam_size=2, width=2, max_steps=3, step_max_tokens=5, max_new_tokens=12,
                                   temperature=1.0, top_p=1.0, seed=3, batch_size=3)
    res = beam_search(model, tok, value, q, prompt, st, set())  # no stop tokens: every step is its full budget
    gens = [e for e in res.log if e[0] == "generate"]
    assert res.generated_tokens == sum(e[3] for e in gens) > 0
    for _, parent, budget, n, eos in gens:
        assert budget == min(5, 12 - parent) and (n == budget if not eos else 1 <= n <= budget)
    # the tree: 1 root x 2, then (up to) 2 kept prefixes x 2 per step; parents grow by whole steps
    assert [e[1] for e in gens[:2]] == [0, 0] and len(gens) <= 2 + 4 + 4
    scored = _check_scored_tokens(res, t_tok, t_prompt)
    assert len(scored) == len(gens)  # every new prefix scored once
    again = beam_search(model, tok, value, q, prompt, SearchSettings(**{**st.__dict__, "batch_size": 8}), set())
    assert (again.text, again.generated_tokens, again.scorer_tokens) == (res.text, res.generated_tokens, res.scorer_tokens)


def test_mcts_counts_every_token(search_setup):
    from distill.bench.search import SearchSettings, mcts

    model, tok, value, q, prompt, t_tok, t_prompt = search_setup
    st = SearchSettings.from_bench(width=2, max_steps=2, step_max_tokens=4, max_new_tokens=10, expansions=4,
                                   rollouts=2, uct_c=1.0, temperature=1.0, top_p=1.0, seed=5)
    res = mcts(model, tok, value, q, prompt, st, set())
    gens = [e for e in res.log if e[0] == "generate"]
    assert res.generated_tokens == sum(e[3] for e in gens) > 0
    for _, parent, budget, n, eos in gens:
        assert budget in (min(4, 10 - parent), 10 - parent)  # a step, or a rollout to the end
        assert n == budget if not eos else 1 <= n <= budget
    # each expansion: one step and 2 rollouts (3 draws), or a finished node that draws nothing
    assert len(gens) <= 4 * 3 and len(gens) % 3 == 0
    _check_scored_tokens(res, t_tok, t_prompt)
    assert res.text and res.value is not None
    again = mcts(model, tok, value, q, prompt, st, set())
    assert again.log == res.log


def test_search_settings_declare_no_default_of_their_own(tmp_path):
    """Each search setting's default is the `distill bench` option's (declared once, in BenchConfig): the
    searches called from Python ran with step_max_tokens 64 while the CLI's default was 48."""
    import dataclasses

    from distill.bench.runner import SCORING_BATCH, BenchConfig
    from distill.bench.search import BENCH_OPTIONS, SearchSettings
    from distill.options import declared

    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(SearchSettings))
    assert set(BENCH_OPTIONS) == {f.name for f in dataclasses.fields(SearchSettings)}
    defaults = {d.name: d.default for d in declared(BenchConfig)}
    st = SearchSettings.from_bench()
    for setting, name in BENCH_OPTIONS.items():
        assert getattr(st, setting) == (SCORING_BATCH if name == "batch_size" else defaults[name]), setting
    assert st.step_max_tokens == 48
    cfg = BenchConfig(models=["s=x"], out=tmp_path, step_max_tokens=5, search_width=3, mcts_expansions=2,
                      batch_size=4)
    st = SearchSettings.from_bench(cfg, seed=9)
    assert (st.step_max_tokens, st.width, st.expansions, st.batch_size, st.seed) == (5, 3, 2, 4, 9)
    with pytest.raises(TypeError, match="search_width"):
        SearchSettings.from_bench(search_width=3)  # settings go by their own names


def test_bench_search_rules_end_to_end(tiny_model_dir, tiny_student_dir, tmp_path):
    from distill.bench.runner import run_bench

    with pytest.raises(DistillError, match="needs --step-scorer"):
        run_bench([f"s={tiny_student_dir}"], out=tmp_path / "x", select="beam")
    out = tmp_path / "o"
    res = run_bench([f"s={tiny_student_dir}"], task="synthetic", limit=2, out=out, select="greedy,beam,mcts",
                    step_scorer=f"teacher={tiny_model_dir}", beam_size=1, search_width=2, search_steps=2,
                    step_max_tokens=4, mcts_expansions=2, max_new_tokens=8, progress=False)
    m = res["models"][0]
    records = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    for rule in ("beam", "mcts"):
        mine = [r for r in records if r["kind"] == rule]
        assert len(mine) == 2
        point = m["compute"][rule][0]
        assert point["generated_tokens"] == pytest.approx(sum(r["num_tokens"] for r in mine) / 2) and point["generated_tokens"] > 0
        assert point["scorer_tokens"] == pytest.approx(sum(r["scorer_tokens"] for r in mine) / 2) and point["scorer_tokens"] > 0
        assert m["accuracy"][rule]["correct"] == sum(r["correct"] for r in mine)
    assert res["settings"]["search"]["beam_size"] == 1


def test_stop_ids_end_a_row_after_the_token(search_setup):
    """A row stops right after a stop token (kept, unfinished), and what it drew until then is what
    the same seed draws without stops."""
    from distill.models.sampling import generate_rows, newline_ids

    model, tok, *_ = search_setup
    ids = [tok("Tom has 3 apples", add_special_tokens=False)["input_ids"]] * 2
    free = generate_rows(model, tok, ids, [11, 12], temperature=1.0, top_p=1.0, max_new_tokens=6)
    first = {free[0].token_ids[2], free[1].token_ids[2]}  # stop at the third token of each row
    stopped = generate_rows(model, tok, ids, [11, 12], temperature=1.0, top_p=1.0, max_new_tokens=6, stop_ids=first)
    for f, s in zip(free, stopped):
        k = next(i for i, t in enumerate(f.token_ids) if t in first)
        assert s.token_ids == f.token_ids[:k + 1] and s.num_tokens == k + 1 and not s.finished
    nl = newline_ids(tok)
    assert tok.convert_tokens_to_ids("Ċ") in nl and all("\n" in tok.decode([i]) for i in nl)
