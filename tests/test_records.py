"""Record loading (JSONL, JSON, Parquet, saved datasets) and tokenization with loss masks."""

from __future__ import annotations

import json

import pytest

from distill.data.records import encode_record, load_records, parse_field_map, tokenize_record
from distill.errors import DistillError

ROWS = [
    {"question": "What is 2+2?", "answer": "4", "extra": 1},
    {"question": "What is 3+3?", "answer": "6", "extra": 2},
]


def test_jsonl_json_parquet_and_datasets_dir(tmp_path):
    import datasets

    fields = parse_field_map(["prompt=question", "completion=answer"])
    expect = [{"prompt": "What is 2+2?", "completion": "4"}, {"prompt": "What is 3+3?", "completion": "6"}]
    jl = tmp_path / "a.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    assert load_records(jl, fields=fields) == expect
    js = tmp_path / "a.json"
    js.write_text(json.dumps(ROWS))
    assert load_records(js, fields=fields) == expect
    ds = datasets.Dataset.from_list(ROWS)
    pq = tmp_path / "a.parquet"
    ds.to_parquet(str(pq))
    assert load_records(pq, fields=fields) == expect
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_records(tmp_path / "saved", fields=fields) == expect
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd", fields=fields, split="test") == expect[1:]
    assert load_records(tmp_path / "dd", fields=fields) == expect
    with pytest.raises(DistillError, match="--split"):
        load_records(tmp_path / "dd", fields=fields, split="validation")
    assert load_records(jl, fields=fields, limit=1) == expect[:1]
    assert load_records(jl, fields=fields, as_chat=True)[0] == {
        "messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    }


def test_bad_sources_and_fields(tmp_path):
    with pytest.raises(DistillError, match="not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DistillError, match="empty"):
        load_records(tmp_path / "e.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(DistillError, match="bad.jsonl:2"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "x.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DistillError, match="record 0.*question"):
        load_records(tmp_path / "x.jsonl")
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DistillError, match="assistant"):
        load_records(tmp_path / "m.jsonl")
    with pytest.raises(DistillError, match="NAME=COLUMN"):
        parse_field_map(["prompt"])
    with pytest.raises(DistillError, match="one of"):
        parse_field_map(["question=prompt"])
    with pytest.raises(DistillError, match="hub"):
        load_records("nobody-xyz/no-such-dataset")  # HF_HUB_OFFLINE=1 in conftest: fails fast


def test_prompt_completion_mask(tiny_tok):
    rec = {"prompt": "Tom has 3 apples.", "completion": " The answer is 7."}
    ids, mask = encode_record(tiny_tok, rec)
    p = tiny_tok("Tom has 3 apples.", add_special_tokens=True)["input_ids"]
    c = tiny_tok(" The answer is 7.", add_special_tokens=False)["input_ids"] + [tiny_tok.eos_token_id]
    assert ids == p + c and mask == [0] * len(p) + [1] * len(c)
    ids2, mask2 = tokenize_record(tiny_tok, rec, max_length=len(p) + 2)
    assert ids2 == ids[: len(p) + 2] and mask2 == mask[: len(p) + 2]


def test_chat_mask_is_final_assistant_turn(tiny_tok):
    msgs = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>3+3</think> 6"},
    ]
    ids, mask = encode_record(tiny_tok, {"messages": msgs})
    full = tiny_tok.apply_chat_template(msgs, tokenize=False)
    prompt = tiny_tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
    n_prompt = len(tiny_tok(prompt, add_special_tokens=False)["input_ids"])
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tiny_tok.decode(ids) == full
    assert tiny_tok.decode([i for i, m in zip(ids, mask) if m]) == "<think>3+3</think> 6<|im_end|>\n"


def test_text_trains_every_token(tiny_tok):
    ids, mask = encode_record(tiny_tok, {"text": "0 1 2 3"})
    assert len(ids) > 0 and mask == [1] * len(ids)
