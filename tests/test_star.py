"""STaR rationalization: problems that sampling got wrong are asked again with the gold answer as a
hint; the rationales that reach it are kept, stored without the hint, and counted in the filter report.

A tiny random teacher answers nothing right, so the verifier here is a fixed function of the
completion text: the counts then follow from the traces file alone, and the test recomputes them.
"""

from __future__ import annotations

import json
import zlib

import pytest

from distill.errors import DistillError
from distill.models.sampling import DEFAULT_SYSTEM_PROMPT, format_prompt, row_seed
from teachers.backends.hf import HFBackend
from teachers.filter import filter_traces
from teachers.generate import HINT_TEMPLATE, generate_traces, read_traces

SAMPLES, RATIONALIZE = 2, 3


def verify(completion: str, gold: str) -> bool:
    """Accepts about one completion in three, as a fixed function of its text and the gold answer."""
    return zlib.crc32(f"{gold}|{completion}".encode()) % 3 == 0


@pytest.fixture(scope="module")
def star_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("star")
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
                            for i in range(8)))
    out = root / "traces.jsonl"
    summary = generate_traces(teacher=str(tiny_model_dir), data=str(data), out=out, samples=SAMPLES,
                              rationalize=RATIONALIZE, temperature=1.0, max_new_tokens=6, batch_size=4, progress=False,
                              device="cpu", verify=verify)
    return root, data, out, summary


def test_rationalization_rows_only_for_problems_sampling_got_wrong(star_run):
    _, _, out, summary = star_run
    traces = read_traces(out)
    sampled = [t for t in traces if not t.get("rationalized")]
    hinted = [t for t in traces if t.get("rationalized")]
    assert len(sampled) == 8 * SAMPLES and all(t["sample"] < SAMPLES for t in sampled)
    solved = {t["prompt_id"] for t in sampled if verify(t["completion"], t["gold"])}
    failed = [f"p{i}" for i in range(8) if f"p{i}" not in solved]
    assert 0 < len(solved) < 8  # both kinds occur with this verifier and seed
    assert [(t["prompt_id"], t["sample"]) for t in hinted] == [(p, SAMPLES + j) for p in failed for j in range(RATIONALIZE)]
    assert summary["rationalized_problems"] == len(failed)
    assert summary["written"] == len(traces)


def test_hinted_rows_were_generated_with_the_hint_and_stored_without_it(star_run, tiny_model_dir):
    _, _, out, _ = star_run
    hinted = [t for t in read_traces(out) if t.get("rationalized")]
    for t in hinted:
        assert t["question"] == f"What is {t['prompt_id'][1:]} + {t['prompt_id'][1:]}?"  # the plain question
        assert "Hint" not in t["question"]
    # the completion is what the teacher writes when it is shown the hint (same row seed)
    t = hinted[0]
    backend = HFBackend(str(tiny_model_dir), device="cpu")
    prompt = format_prompt(backend.tokenizer, HINT_TEMPLATE.format(question=t["question"], answer=t["gold"]),
                           DEFAULT_SYSTEM_PROMPT)
    ids = backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    comp = backend.generate([ids], [row_seed(0, prompt, t["sample"])], temperature=1.0, top_p=0.95, max_new_tokens=6)[0]
    assert comp.text == t["completion"]
    assert t["prompt_tokens"] == len(ids)


def test_filter_counts_problems_solved_by_sampling_and_by_rationalization(star_run):
    root, _, out, _ = star_run
    traces = read_traces(out)
    report = filter_traces(out, root / "kept.jsonl", keep="all-correct", require_format=False, verify=verify, echo=None)
    by_sampling = {t["prompt_id"] for t in traces if not t.get("rationalized") and verify(t["completion"], t["gold"])}
    rationales = [t for t in traces if t.get("rationalized") and verify(t["completion"], t["gold"])]
    by_rationalization = {t["prompt_id"] for t in rationales} - by_sampling
    assert report["solved_by_sampling"] == len(by_sampling) > 0
    assert report["solved_by_rationalization"] == len(by_rationalization) > 0
    assert report["rationalized_passing"] == len(rationales)
    assert report["traces"] == 8 * SAMPLES  # accuracy and yields stay the sampled traces'
    kept = [json.loads(line) for line in (root / "kept.jsonl").read_text().splitlines()]
    kept_hinted = [k for k in kept if k.get("rationalized")]
    assert {k["id"] for k in kept_hinted} == {f"{t['prompt_id']}/{t['sample']}" for t in rationales}
    for k in kept:  # the stored prompt is the plain question: the cache never sees the hint
        user = next(m["content"] for m in k["messages"] if m["role"] == "user")
        assert user == f"What is {k['prompt_id'][1:]} + {k['prompt_id'][1:]}?"
        assert "Hint" not in json.dumps(k["messages"])


def test_resume_adds_nothing_and_a_grown_samples_count_is_refused(star_run, tiny_model_dir):
    _, data, out, _ = star_run
    before = out.read_bytes()
    args = dict(teacher=str(tiny_model_dir), data=str(data), out=out, temperature=1.0, max_new_tokens=6,
                batch_size=4, progress=False, device="cpu", verify=verify)
    again = generate_traces(samples=SAMPLES, rationalize=RATIONALIZE, **args)
    assert again["written"] == 0 and out.read_bytes() == before
    with pytest.raises(DistillError, match="rationalized traces at sample indices"):
        generate_traces(samples=SAMPLES + 1, rationalize=RATIONALIZE, **args)


def test_run_summary_table_reports_the_star_counts(star_run):
    from distill.pipeline.commands import stage_table

    root, _, out, _ = star_run
    report = filter_traces(out, root / "kept-table.jsonl", keep="all-correct", require_format=False, verify=verify,
                           echo=None)
    yield_ = {k: v for k, v in report.items() if k != "per_prompt"}
    table = stage_table({"filter": {"yield": yield_, "wall_s": 0.1}})
    assert (f"solved by sampling {report['solved_by_sampling']}, by STaR rationalization "
            f"{report['solved_by_rationalization']}") in table
