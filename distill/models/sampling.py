"""Sampling from a causal LM: chat prompts, seeded batched generation with a KV cache, self log-probs.

The sampling loop is our own (not `model.generate`) for three reasons: it returns the mean log-prob of
each completion under the model's *unmodified* distribution (used to rank traces, "self" scoring); it
draws every row's randomness from its own generator seeded by (seed, prompt, sample index), so a
completion does not depend on which other rows share its batch (a resumed run reproduces an
uninterrupted one); and it masks logit columns past the tokenizer length (padded embeddings) so they
can never be sampled. Teacher trace generation (`teachers/`) and the benchmark (`distill/bench`) both
sample through here.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from distill.errors import DistillError

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful assistant that solves math word problems. First think step by step inside "
    "<think> and </think>. After </think>, write the final answer on its own line as "
    "'The answer is N.' where N is a number."
)

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
    """The text the model continues: its chat template with the generation prompt appended.

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


def scorer_text(tokenizer, question: str, completion: str) -> str:
    """What a reward model reads: the question and the completion as user / assistant turns of its
    chat template (no system prompt), or "question\\n\\ncompletion" without one. One function, so that
    `distill scorer train` trains on exactly what `distill bench --scorer` scores."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": completion}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        return text if isinstance(text, str) else text[0]
    return f"{question}\n\n{completion}"


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise DistillError("the model's tokenizer has no EOS token: set eos_token in its tokenizer config")
    return {int(i) for i in ids}


def row_seed(seed: int, prompt: str, sample: int) -> int:
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
                   on_step: Callable[[int], None] | None = None, stop_ids: set[int] | None = None) -> list[Completion]:
    """Generate one completion per row (left padded, KV cache, per-row Gumbel-max sampling).

    A row that samples a token of `stop_ids` keeps it and stops there, unfinished (a search that
    grows a trace one step, one line, at a time)."""
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
    stop_tensor = torch.tensor(sorted(stop_ids or ()), dtype=torch.long, device=device)

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
            is_stop = torch.isin(token, stop_tensor) & ~done & ~is_eos
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
            done = done | is_eos | is_stop
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
                       on_batch: Callable[[int, int], None] | None = None,
                       take: Callable[[list], list] | None = None) -> list[list[Completion]]:
    """Sample `num_samples` completions for each prompt text (already chat-templated).

    `temperature=0` is greedy. Returns one list per prompt, in sample order. Each (prompt, sample)
    row draws from its own seeded generator, so results do not depend on `batch_size` beyond float
    rounding of padded batches. `stats` (if given) accumulates tokens and seconds; `on_batch(rows,
    new_tokens)` is called after every batch (progress bars). `take` picks this process's share of the
    batches (`distill.ranks.Ranks.take`); the rows of the other batches are left None, for the caller to
    gather. The batches are those of a one-process run, so together the processes get its results.
    """
    check_settings(num_samples=num_samples, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
    results: list[list[Completion | None]] = [[None] * num_samples for _ in prompts]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    starts = list(range(0, len(rows), batch_size))
    for start in (take(starts) if take is not None else starts):
        chunk = rows[start:start + batch_size]
        t0 = time.perf_counter()
        comps = generate_rows(model, tokenizer, [encoded[p] for p, _ in chunk],
                              [row_seed(seed, prompts[p], s) for p, s in chunk],
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
                  on_step: Callable[[int], None] | None = None, stop_ids: set[int] | None = None) -> list[Completion]:
    """One completion per (token ids, seed) row; the building block of the batched APIs. `stop_ids`:
    tokens after which a row stops, unfinished (the token kept)."""
    pad_id = tokenizer.pad_token_id
    eos = eos_ids(model, tokenizer)
    if pad_id is None:
        pad_id = min(eos)
    return _generate_rows(model, tokenizer, prompt_ids, seeds, temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id, on_step=on_step, stop_ids=stop_ids)


def check_settings(*, num_samples: int, temperature: float, top_p: float, max_new_tokens: int,
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


def newline_ids(tokenizer) -> set[int]:
    """The tokens whose text contains a newline: where a line-by-line step ends."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
    return {i for i, t in enumerate(texts) if "\n" in t}
