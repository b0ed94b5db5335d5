"""Filter modes, the yield report and the cache-input format of kept traces (hand-made trace files)."""

from __future__ import annotations

import json

import pytest

import cli
from distill.data.records import load_records
from distill.errors import DistillError
from teachers.filter import filter_traces, report_path

SETTINGS = {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 64, "system_prompt": "Think first.", "seed": 0,
            "format_version": 1}
GOOD = "<think>3 + 4 = 7</think>\nThe answer is 7."


def _trace(pid, sample, completion, gold="7", logprob=-1.0):
    return {"prompt_id": pid, "sample": sample, "question": f"question {pid}", "gold": gold, "completion": completion,
            "mean_logprob": logprob, "num_tokens": 10, "settings": SETTINGS, "teacher": {"name_or_path": "t"}}


TRACES = [
    _trace("p1", 0, "<think>3 + 4 = 8</think> The answer is 8."),  # wrong
    _trace("p1", 1, GOOD, logprob=-2.0),  # right, well formed
    _trace("p1", 2, "<think>seven</think> #### 7", logprob=-0.5),  # right, well formed, most confident
    _trace("p1", 3, "The answer is 7.", logprob=-0.1),  # right, no tags
    _trace("p2", 0, "<think>hmm</think> 5"),  # wrong
    _trace("p2", 1, "no idea"),  # wrong, no number
    _trace("p3", 0, "It is $7.", logprob=-0.3),  # right, no tags
]


@pytest.fixture()
def traces_file(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TRACES))
    return path


@pytest.mark.parametrize("keep,require_format,expected", [
    ("all-correct", True, ["p1/1", "p1/2"]),
    ("all-correct", False, ["p1/1", "p1/2", "p1/3", "p3/0"]),
    ("first-correct", True, ["p1/1"]),
    ("first-correct", False, ["p1/1", "p3/0"]),
    ("best", True, ["p1/2"]),
    ("best", False, ["p1/2", "p3/0"]),  # format outranks confidence: p1/3 is more confident but untagged
    ("all", True, ["p1/0", "p1/1", "p1/2", "p1/3", "p2/0", "p2/1", "p3/0"]),
])
def test_keep_modes(traces_file, tmp_path, keep, require_format, expected):
    out = tmp_path / "kept.jsonl"
    report = filter_traces(traces_file, out, keep=keep, require_format=require_format, echo=None)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [k["id"] for k in kept] == expected
    assert report["kept"] == len(expected)
    assert report["trace_yield"] == pytest.approx(len(expected) / 7)


def test_report_counts_and_summary_file(traces_file, tmp_path):
    out = tmp_path / "kept.jsonl"
    lines = []
    report = filter_traces(traces_file, out, keep="all-correct", require_format=True, echo=lines.append)
    assert report["prompts"] == 3 and report["traces"] == 7
    assert report["correct"] == 4 and report["format_ok"] == 4 and report["passing"] == 2
    assert report["prompts_with_correct"] == 2 and report["prompts_kept"] == 1
    assert report["prompt_yield"] == pytest.approx(1 / 3)
    assert report["per_prompt"]["p1"] == {"samples": 4, "correct": 3, "format_ok": 3, "passing": 2, "kept": 2}
    assert report["per_prompt"]["p2"]["kept"] == 0
    assert json.loads(report_path(out).read_text()) == json.loads(json.dumps(report))
    assert report_path(out).name == "kept.report.json"
    assert lines[-1].startswith("kept 2/7 traces (28.6%) for 1/3 prompts")
    assert any(line.startswith("p1 ") for line in lines)


def test_kept_records_are_cache_input(traces_file, tmp_path, tiny_tok):
    from distill.data.records import encode_record
    from distill.models.sampling import format_prompt

    out = tmp_path / "kept.jsonl"
    filter_traces(traces_file, out, keep="first-correct", echo=None)
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["messages"] == [{"role": "system", "content": "Think first."},
                               {"role": "user", "content": "question p1"},
                               {"role": "assistant", "content": GOOD}]
    assert rec["reward"] == {"accuracy": 1.0, "format": 1.0} and rec["pred"] == "7"
    loaded = load_records(str(out))
    assert loaded == [{"messages": rec["messages"]}]
    # the cache sees the same prompt the teacher continued, and trains exactly the completion
    ids, mask = encode_record(tiny_tok, loaded[0])
    prompt_len = len(tiny_tok(format_prompt(tiny_tok, "question p1", "Think first."), add_special_tokens=False)["input_ids"])
    assert sum(mask[:prompt_len]) == 0 and all(mask[prompt_len:prompt_len + 3])


def test_truncated_tail_is_ignored(traces_file, tmp_path):
    with open(traces_file, "a") as fh:
        fh.write('{"prompt_id": "p9", "sam')
    report = filter_traces(traces_file, tmp_path / "k.jsonl", echo=None)
    assert report["traces"] == 7


def test_bad_inputs(traces_file, tmp_path):
    with pytest.raises(DistillError, match="unknown --keep 'most'"):
        filter_traces(traces_file, tmp_path / "k.jsonl", keep="most")
    with pytest.raises(DistillError, match="not found"):
        filter_traces(tmp_path / "none.jsonl", tmp_path / "k.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\n')
    with pytest.raises(DistillError, match="lacks"):
        filter_traces(bad, tmp_path / "k.jsonl")
    assert not (tmp_path / "k.jsonl").exists()


def test_cli_filter(traces_file, tmp_path, capsys):
    out = tmp_path / "kept.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["teacher", "filter", str(traces_file), "--out", str(out), "--keep", "best", "--no-require-format"])
    assert exit_info.value.code in (0, None)
    assert "kept 2/7 traces" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["teacher", "filter", str(tmp_path / "missing.jsonl"), "--out", str(out)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: traces file not found: {tmp_path / 'missing.jsonl'}"
