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
    with pytest.raises(DistillError, match="FIELD=COLUMN"):
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


# ---- prompt and completion are tokenized as one text -------------------------------------------


@pytest.fixture(scope="module")
def sp_llama(tmp_path_factory):
    """(fast, slow, processor): a Llama-2-style SentencePiece BPE model trained here (identity normalisation,
    byte fallback, split digits, dummy "▁" prefix), as the fast `LlamaTokenizer` with legacy=True and as a
    slow SentencePiece tokenizer without offsets. No protobuf needed: vocab and merges come from the
    processor, as transformers' own converter takes them."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from helpers import _CORPUS

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4), model_writer=buf, vocab_size=400, model_type="bpe", unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    fast = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), legacy=True, add_prefix_space=True,
                          add_bos_token=True)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    slow = SentencePieceBackend(vocab_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert fast.is_fast and not slow.is_fast
    text = "Question: what is 15 minus 8?\nThe answer is 7."
    assert fast(text)["input_ids"] == [fast.bos_token_id] + sp.encode(text) and slow(text)["input_ids"] == sp.encode(text)
    return fast, slow, sp


def _split(tok, ids, mask):
    return tok.convert_ids_to_tokens([i for i, m in zip(ids, mask) if not m]), tok.convert_ids_to_tokens([i for i, m in zip(ids, mask) if m])


@pytest.mark.parametrize("prompt,completion,differs", [
    ("Question: what is 15 minus 8?\n", "The answer is 7.", ("fast", "slow")),  # alone: "The" -> "▁The"
    ("The answer is", " 7.", ("slow",)),  # alone: " 7." -> "▁▁7." (the fast Metaspace does not double it)
])
def test_sentencepiece_completion_is_tokenized_with_its_prompt(sp_llama, prompt, completion, differs):
    fast, slow, _ = sp_llama
    for name, tok in (("fast", fast), ("slow", slow)):
        full = tok(prompt + completion)["input_ids"]
        alone = tok(prompt)["input_ids"]
        separate = alone + tok(completion, add_special_tokens=False)["input_ids"]
        assert (separate != full) == (name in differs)  # the legacy prefix space: the defect guarded against
        ids, mask = encode_record(tok, {"prompt": prompt, "completion": completion})
        assert ids == full + [tok.eos_token_id]
        assert full[: len(alone)] == alone  # the prompt ends at a token boundary here
        assert mask == [0] * len(alone) + [1] * (len(ids) - len(alone))
    assert encode_record(slow, {"prompt": prompt, "completion": completion})[1] == \
        encode_record(fast, {"prompt": prompt, "completion": completion})[1][1:]  # fast adds BOS, slow does not


@pytest.mark.parametrize("prompt,completion", [
    ("Sara reads 20 pages each nig", "ht."),    # the prompt ends inside a word
    ("Sara reads 20 pages each ", "night."),    # the prompt ends with a space that "▁night" absorbs
])
def test_straddling_token_is_a_completion_token(sp_llama, tiny_tok, prompt, completion):
    fast, slow, _ = sp_llama
    for tok in (fast, tiny_tok):
        enc = tok(prompt + completion, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        ids, mask = encode_record(tok, {"prompt": prompt, "completion": completion})
        assert ids == enc["input_ids"] + [tok.eos_token_id]
        first = mask.index(1)
        assert mask == [0] * first + [1] * (len(ids) - first)
        straddles = spans[first][0] < len(prompt) < spans[first][1]
        # the token holding the prompt's last characters and the completion's first is trained
        assert straddles or (tok is tiny_tok and completion == "night.")  # byte-level BPE splits before " "
        assert all(end <= len(prompt) for _, end in spans[:first])
        if straddles:
            assert tok.convert_ids_to_tokens(ids[first]) in ("▁night", "nigh")
    # slow tokenizer (no offsets): the completion starts where the prompt alone and the joint text differ
    slow_ids, slow_mask = encode_record(slow, {"prompt": prompt, "completion": completion})
    fast_ids, fast_mask = encode_record(fast, {"prompt": prompt, "completion": completion})
    assert slow_ids == fast_ids[1:] and slow_mask == fast_mask[1:]  # fast adds BOS, slow does not


def test_sentencepiece_chat_turn_is_tokenized_with_its_template(sp_llama):
    fast, _, _ = sp_llama
    fast.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                          "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    msgs = [{"role": "user", "content": "what is 15 minus 8?"}, {"role": "assistant", "content": "The answer is 7."}]
    ids, mask = encode_record(fast, {"messages": msgs})
    full = fast.apply_chat_template(msgs, tokenize=False)
    assert ids == fast(full, add_special_tokens=False)["input_ids"]
    _, trained = _split(fast, ids, mask)
    assert "".join(trained).replace("▁", " ") == "The answer is 7."  # alone it would be "▁The answer ..."
