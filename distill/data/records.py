"""Load training records from JSONL, Parquet, a saved `datasets` directory or a hub data set, and tokenize them.

A record is one of three kinds (checked in this order):
  * `prompt` + `completion`: the completion tokens are trained, the prompt is context;
  * `messages` (chat): the tokenizer's chat template is applied; the final assistant turn is trained;
  * `text`: every token is trained.
Column names are mapped with `fields={"prompt": "question", "completion": "answer"}` (CLI:
`--field prompt=question`). Tokenization is shared by the cache builder and the trainer so that both see
the same ids and loss mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from distill.errors import DistillError
from distill.io import iter_jsonl
from distill.models.source import looks_like_hub_id

CANONICAL = ("prompt", "completion", "messages", "text")


def parse_field_map(items: Iterable[str] | None) -> dict[str, str]:
    """CLI `--field FIELD=COLUMN` items as {field: column}, FIELD one of CANONICAL."""
    from distill.options import parse_assignments

    return parse_assignments(items, keys=CANONICAL, flag="--field")


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file, or of a `.json` file holding one JSON array of objects."""
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except ValueError as err:
                raise DistillError(f"{path} is not valid JSON ({err})") from None
            if not all(isinstance(r, dict) for r in data):
                raise DistillError(f"{path}: every element of the JSON array must be an object")
            return data
    return [row for _, row in iter_jsonl(path)]


def _from_datasets_obj(ds, split: str | None, where: str) -> list[dict]:
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        name = split or ("train" if "train" in ds else None)
        if name is None or name not in ds:
            raise DistillError(f"{where} has splits {list(ds.keys())}; pick one with --split")
        ds = ds[name]
    return [dict(r) for r in ds]


_DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".pq", ".csv", ".txt")


def _looks_like_hub_id(source: str) -> bool:
    return looks_like_hub_id(source) and not source.lower().endswith(_DATA_SUFFIXES)


def load_raw(source: str | Path, *, split: str | None = None, config: str | None = None) -> list[dict]:
    """Read raw rows (dicts) from a file, a saved datasets dir, or a hub data set id."""
    source_s = str(source)
    path = Path(source_s).expanduser()
    if path.is_file():
        if path.stat().st_size == 0:
            raise DistillError(f"data file {path} is empty")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return _read_jsonl(path)
        if suffix in (".parquet", ".pq"):
            try:
                import pyarrow.parquet as pq

                return pq.read_table(path).to_pylist()
            except Exception as err:  # pyarrow raises many types for a bad file
                raise DistillError(f"{path} cannot be read as Parquet ({str(err).splitlines()[0]})") from None
        raise DistillError(f"data file {path} has unknown extension {suffix!r}; use .jsonl, .json or .parquet")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
            import datasets

            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as err:
                raise DistillError(f"{path} cannot be loaded as a saved datasets directory ({str(err).splitlines()[0]})") from None
            return _from_datasets_obj(ds, split, str(path))
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".parquet", ".json"))
        if not files:
            raise DistillError(f"data directory {path} holds no .jsonl/.parquet files and is not a saved datasets directory")
        rows: list[dict] = []
        for f in files:
            rows.extend(load_raw(f))
        return rows
    if _looks_like_hub_id(source_s):
        import datasets

        try:
            ds = datasets.load_dataset(source_s, config, split=split or "train")
        except Exception as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DistillError(f"data set {source_s!r} is neither a local path nor loadable from the hub ({msg})") from None
        return _from_datasets_obj(ds, split, source_s)
    raise DistillError(f"data file {source_s} not found")


def normalise_record(row: Mapping[str, Any], fields: Mapping[str, str] | None = None, *, as_chat: bool = False) -> dict:
    """Map one raw row to {'prompt','completion'} | {'messages'} | {'text'}; raise if it has none of them."""
    fields = dict(fields or {})
    col = {k: fields.get(k, k) for k in CANONICAL}
    if col["prompt"] in row and col["completion"] in row:
        p, c = row[col["prompt"]], row[col["completion"]]
        if not isinstance(p, str) or not isinstance(c, str):
            raise DistillError(f"fields {col['prompt']!r}/{col['completion']!r} must be strings")
        if as_chat:
            return {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
        return {"prompt": p, "completion": c}
    if col["messages"] in row:
        msgs = row[col["messages"]]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in msgs):
            raise DistillError(f"field {col['messages']!r} must be a non-empty list of {{role, content}} messages")
        if msgs[-1]["role"] != "assistant":
            raise DistillError(f"the last message of {col['messages']!r} must be the assistant turn to train on, got {msgs[-1]['role']!r}")
        return {"messages": [dict(role=m["role"], content=m["content"]) for m in msgs]}
    if col["text"] in row:
        t = row[col["text"]]
        if not isinstance(t, str):
            raise DistillError(f"field {col['text']!r} must be a string")
        return {"text": t}
    have = ", ".join(sorted(map(str, row.keys()))[:8]) or "none"
    raise DistillError(
        f"record has none of the fields prompt+completion, messages or text (it has: {have}); "
        f"map yours with --field, e.g. --field prompt=question --field completion=answer"
    )


def load_records(
    source: str | Path,
    *,
    fields: Mapping[str, str] | None = None,
    split: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    as_chat: bool = False,
) -> list[dict]:
    """Load and normalise records; DistillError if the source is missing, empty or lacks the fields."""
    rows = load_raw(source, split=split, config=config)
    if limit is not None:
        if limit <= 0:
            raise DistillError(f"--limit must be positive, got {limit}")
        rows = rows[:limit]
    if not rows:
        raise DistillError(f"data source {source} holds no records")
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(normalise_record(row, fields, as_chat=as_chat))
        except DistillError as err:
            raise DistillError(f"{source} record {i}: {err}") from None
    return out


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _split_joint(tokenizer, prompt: str, full: str, *, special: bool) -> tuple[list[int], int]:
    """(ids of `full` tokenized once, number of leading prompt tokens); `full` starts with `prompt`.

    Fast tokenizers: the first token whose character span ends past len(prompt) starts the completion,
    so a token that straddles the boundary is a completion token. Slow tokenizers (no offsets): the
    prompt tokenized alone is compared with the joint ids and the completion starts at the first token
    where they differ (equal to the offset rule unless the tokenizer's choices depend on later text).
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=special, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        n_prompt = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
        return ids, n_prompt
    ids = _encode(tokenizer, full, special=special)
    alone = _encode(tokenizer, prompt, special=special)
    n_prompt = 0
    while n_prompt < min(len(ids), len(alone)) and ids[n_prompt] == alone[n_prompt]:
        n_prompt += 1
    return ids, n_prompt


def encode_record(tokenizer, record: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """Untruncated (input_ids, loss_mask) of a normalised record; loss_mask 1 = trained (completion) token.

    The prompt and the completion are tokenized TOGETHER, as one text, and the loss mask is split at
    the prompt's character length. Tokenizing them separately (the obvious way) is wrong for
    SentencePiece tokenizers that prepend a space marker to every call (Llama-2, Mistral, Gemma in
    legacy mode): the completion's first token would get a "▁" that the model never produces after
    that prompt, and the trained ids would not be the ids of the text. Joint tokenization gives the
    ids of the text exactly as a model reads (and would have written) it.

    A token that straddles the boundary (the prompt ends inside it, e.g. "... is 1" + "20 apples" ->
    " 120") is a COMPLETION token: it is trained and is not context. Making it context would put
    part of the answer into what the student conditions on and never teach it to write that part;
    as a completion token, every completion character is trained and no completion character is
    ever seen as input. The price is that the trained context lacks the prompt's last characters
    (inside the straddling token) while at inference the prompt, tokenized alone, ends with them; end
    prompts at a natural token boundary (no trailing space; start the completion with the space)
    and the two agree.

    prompt+completion: special tokens as the tokenizer adds them to one text (BOS if it has one),
    then EOS appended (so the student learns to stop) unless the completion already ends with it.
    messages: the prompt is the chat template of all but the last turn with the generation prompt;
    the completion is the rest of the full templated conversation (no special tokens added: the
    template writes them). text: all tokens trained. Slow tokenizers without offsets: see
    `_split_joint`.
    """
    if "messages" in record:
        msgs = record["messages"]
        if not getattr(tokenizer, "chat_template", None):
            raise DistillError("records are chat messages but the tokenizer has no chat template; use prompt/completion records")
        prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt):
            raise DistillError("the chat template renders the conversation differently from its prompt; cannot find the final assistant turn")
        ids, n_prompt = _split_joint(tokenizer, prompt, full, special=False)
        return ids, [0] * n_prompt + [1] * (len(ids) - n_prompt)
    if "prompt" in record:
        prompt = record["prompt"]
        ids, n_prompt = _split_joint(tokenizer, prompt, prompt + record["completion"], special=True)
        eos = tokenizer.eos_token_id
        if eos is not None and (len(ids) == n_prompt or ids[-1] != eos):
            ids.append(eos)
        return ids, [0] * n_prompt + [1] * (len(ids) - n_prompt)
    if "text" in record:
        ids = _encode(tokenizer, record["text"], special=True)
        return ids, [1] * len(ids)
    raise DistillError("record has none of prompt+completion, messages or text")


def tokenize_record(tokenizer, record: Mapping[str, Any], max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) truncated on the right to `max_length` tokens."""
    ids, mask = encode_record(tokenizer, record)
    if max_length is not None and len(ids) > max_length:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask
