"""Sampling from a causal LM: chat prompts, seeded batched generation with a KV cache, self log-probs.

The sampling loop is our own (not `model.generate`) for three reasons: it returns the mean log-prob of
each completion under the model's *unmodified* distribution (used to rank traces, "self" scoring); it
draws every row's randomness from its own generator seeded by (seed, prompt, sample index), so a
completion does not depend on which other rows share its batch (a resumed run reproduces an
uninterrupted one); and it masks logit columns past the tokenizer length (padded embeddings) so they
can never be sampled. Teacher trace generation (`teachers/`) and the benchmark (`distill/bench`) both
sample through here.

Throughput (decoding is overhead-bound unless the batch is large and stays full): rows are decoded
with continuous batching (a finished row leaves at once and a waiting row takes its slot), the KV
cache is preallocated and written in place (transformers' DynamicCache copies itself every step),
attention reads only the columns live rows use, only the last position goes through the output head
(on a CPU as `W @ h^T`, a faster GEMM layout there), and a sample costs one uniform per row and step
plus a top-64 rather than a full sort of the vocabulary. Batches are sized in tokens
(`DEFAULT_BATCH_TOKENS`), not rows.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from distill.errors import DistillError

# KV-cache positions (prompt + completion, summed over the rows) decoded together when no batch size
# is given: measured on SmolLM2-135M (benchmarks/bench_generate.py), decode throughput grows with
# the batch up to about this size on a 2-core CPU; on a GPU it is a modest memory budget.
DEFAULT_BATCH_TOKENS = 32768
# Prompt tokens per prefill forward when rows enter the batch.
_PREFILL_TOKENS = 8192
# Rows per independently decoded chunk of `sample_completions`, in decode batches: large enough that
# the batch rarely drains at a chunk's end; the unit several processes share.
CHUNK_BATCHES = 8
# Tokens looked at for the top-p nucleus before a full sort of the vocabulary.
_TOP_CANDIDATES = 64

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


# ----------------------------------------------------------------------------- batch sizing


def decode_capacity(prompt_lengths: Sequence[int], max_new_tokens: int, *, batch_size: int | None = None,
                    batch_tokens: int | None = None) -> int:
    """How many rows decode together: `batch_size` when given, else as many as `batch_tokens` KV-cache
    positions hold (each row needs its prompt plus `max_new_tokens`); never more than the rows
    (`prompt_lengths` has one entry per row).

    Sized by tokens because that is what costs memory and time per step: 64 rows of 100-token prompts
    and 64 rows of 2,000-token prompts are very different batches.
    """
    rows = max(len(prompt_lengths), 1)
    if batch_size is not None:
        return max(1, min(rows, batch_size))
    budget = DEFAULT_BATCH_TOKENS if batch_tokens is None else batch_tokens
    longest = max(prompt_lengths, default=1)
    return max(1, min(rows, budget // (longest + max_new_tokens)))


# ----------------------------------------------------------------------------- choosing tokens


def _nucleus_draw(sorted_probs, order, top_p, u):
    """Token ids drawn by inverse CDF from each row's top-p nucleus.

    `sorted_probs` [n, k] descending (a prefix of the full distribution that contains the nucleus),
    `order` [n, k] their token ids, `top_p` [n], `u` [n] uniforms in [0, 1). The nucleus is the
    smallest prefix whose mass reaches top_p: a token is kept while the mass strictly before it is
    below top_p (the most likely token is always kept).
    """
    import torch

    cum = sorted_probs.cumsum(-1)
    kept = ((cum - sorted_probs) < top_p[:, None]).sum(-1).clamp(min=1)  # nucleus size, a prefix
    mass = cum.gather(-1, (kept - 1)[:, None])
    j = torch.searchsorted(cum, u[:, None] * mass).squeeze(-1)
    j = torch.minimum(j, kept - 1)
    return order.gather(-1, j[:, None]).squeeze(-1)


def _draw(scores, top_p, u):
    """One sample per row from softmax(scores) truncated to its top-p nucleus, by inverse CDF with the
    row's uniform `u`.

    One uniform per row and step (not one per vocabulary entry): the row's randomness is a fixed
    sequence drawn from its own seed, so what a row samples does not depend on the other rows of its
    batch. The nucleus is looked for among the top `_TOP_CANDIDATES` tokens first (a partial top-k,
    far cheaper than sorting a 50k-256k vocabulary every step); a row whose nucleus is wider falls
    back to a full sort, so the result is exact either way. top_p = 1 samples the whole distribution
    in vocabulary order, without sorting.
    """
    import torch

    n, width = scores.shape
    token = torch.empty(n, dtype=torch.long, device=scores.device)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    whole = top_p >= 1.0
    if bool(whole.any()):
        rows = whole.nonzero().flatten()
        cum = torch.exp(scores[rows] - lse[rows]).cumsum(-1)
        j = torch.searchsorted(cum, (u[rows] * cum[:, -1])[:, None]).squeeze(-1)
        token[rows] = j.clamp(max=width - 1)
    rows = (~whole).nonzero().flatten()
    if len(rows):
        every = len(rows) == n  # the usual case: no copy of the [n, V] scores
        sub, sub_lse, p, uu = (scores, lse, top_p, u) if every else (scores[rows], lse[rows], top_p[rows], u[rows])
        vals, order = sub.topk(min(width, _TOP_CANDIDATES), dim=-1)
        probs = torch.exp(vals - sub_lse)
        wide = probs.sum(-1) < p  # the nucleus reaches past the candidates: sort those rows fully
        if bool(wide.any()):
            w = wide.nonzero().flatten()
            full_vals, full_order = sub[w].sort(dim=-1, descending=True)
            token[rows[w]] = _nucleus_draw(torch.exp(full_vals - sub_lse[w]), full_order, p[w], uu[w])
        narrow = (~wide).nonzero().flatten()
        if len(narrow):
            token[rows[narrow]] = _nucleus_draw(probs[narrow], order[narrow], p[narrow], uu[narrow])
    return token


def pick_tokens(logits, temperature, top_p, u):
    """Next token of each row of `logits` [n, V] (fp32, padded columns already cut off): the argmax
    where `temperature` [n] is 0, else a top-p sample of softmax(logits / temperature) using the
    row's uniform `u` [n]."""
    import torch

    sampled = temperature > 0
    if not bool(sampled.any()):
        return logits.argmax(dim=-1)
    if bool(sampled.all()):
        return _draw(logits / temperature[:, None], top_p, u)
    token = logits.argmax(dim=-1)
    rows = sampled.nonzero().flatten()
    token[rows] = _draw(logits[rows] / temperature[rows, None], top_p[rows], u[rows])
    return token


# ----------------------------------------------------------------------------- KV cache stores


def _new_cache(model):
    """A fresh transformers DynamicCache for `model` (per-layer types from its config when the
    installed transformers supports that), or None on versions without one."""
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:  # pragma: no cover - very old transformers
        return None
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - transformers < 4.56 takes no config
        return DynamicCache()


@functools.lru_cache(maxsize=1)
def _slot_layer_class():
    """`_SlotLayer`, built on first use so that importing this module does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class _SlotLayer(DynamicLayer):
        """A DynamicLayer over preallocated [slots, heads, capacity, dim] buffers written in place.

        transformers' DynamicLayer concatenates the whole cache with each new token (a full copy of
        every layer's keys and values per decoding step: 31% of a batch-32 step of SmolLM2-135M on a
        CPU, measured); this one writes the new column and returns views. The store that owns it
        (`_SlotStore`) places, drops and trims rows.
        """

        def __init__(self):
            super().__init__()
            self.kbuf = self.vbuf = None
            self.length = 0  # the buffers' columns [base, length) are what attention reads
            self.base = 0

        def lazy_initialization(self, key_states, value_states) -> None:
            self.device, self.is_initialized = key_states.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            self.kbuf[:, :, self.length:end] = key_states
            self.vbuf[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self.kbuf[:, :, self.base:end], self.vbuf[:, :, self.base:end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length - self.base

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length - self.base + query_length, 0

        def set_buffers(self, kbuf, vbuf, length: int, base: int = 0) -> None:
            self.kbuf, self.vbuf, self.length, self.base = kbuf, vbuf, length, base
            self.keys, self.values = kbuf[:, :, base:length], vbuf[:, :, base:length]
            self.device, self.is_initialized = kbuf.device, True

    return _SlotLayer


class _SlotStore:
    """Rows decoded together in a fixed number of slots sharing one time axis; a finished row's slot
    is refilled with a waiting row (continuous batching).

    Every slot's keys and values live in preallocated buffers. A row placed while the shared axis is
    at column L occupies columns [L - prompt, L); the 2D attention mask hides everything else in its
    slot (what an earlier row left there included), and each row's own position ids (RoPE) make the
    layout invisible to the model. Rows are admitted longest prompt first, so a later prompt always
    fits left of L. Attention reads only columns [base, L): `base` follows the leftmost column a live
    row still uses, every step, by moving a view (no copy), so a step never reads the dead columns
    of rows that left (up to a fifth of a step's attention with a copying trim every 64+ columns).
    Only when the buffers are full are the live columns copied to fresh ones with room to grow.
    """

    refill = True

    def __init__(self, model, cache, slots: int, headroom: int):
        self.model, self.cache, self.batch, self.headroom = model, cache, slots, headroom
        self.mask = None  # bool [slots, capacity]
        self.length = 0
        self.base = 0  # columns left of it are used by no live row

    @classmethod
    def create(cls, model, slots: int, headroom: int):
        """A store for `model`, or None when its cache layers are not plain full-attention layers
        (sliding windows, linear attention, older transformers): those use `_PlainStore`."""
        try:
            from transformers.cache_utils import DynamicLayer
        except ImportError:
            return None
        probe = _new_cache(model)
        layers = getattr(probe, "layers", None)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if not layers or len(layers) != getattr(config, "num_hidden_layers", -1):
            return None
        if any(type(layer) is not DynamicLayer for layer in layers):
            return None
        layer_class = _slot_layer_class()
        probe.layers = [layer_class() for _ in layers]
        return cls(model, probe, slots, headroom)

    def prefill_cache(self):
        return _new_cache(self.model)

    def place(self, slots: list[int], kv: list[tuple]) -> tuple[int, int]:
        """Copy one prompt's keys and values (`kv`: per layer ([1, heads, P, dim], same for values))
        into `slots`, columns [L - P, L). Returns the column the prompt starts at (for trimming) and
        how far the columns of the rows already there moved right (when P is longer than the axis)."""
        import torch

        width, shift = kv[0][0].shape[2], 0
        if self.mask is None:
            self._allocate(kv, width)
        elif width > self.length:  # a longer prompt than the axis: shift every slot right (rare)
            shift = width - self.length
            self._repack(torch.arange(self.batch, device=self.mask.device), 0, shift=shift)
        dest = torch.as_tensor(slots, device=self.mask.device)
        start = self.length - width
        if start < self.base:
            self._set_base(start)
        for layer, (k, v) in zip(self.cache.layers, kv):
            layer.kbuf[dest, :, start:self.length] = k
            layer.vbuf[dest, :, start:self.length] = v
        self.mask[dest, :start] = False
        self.mask[dest, start:self.length] = True
        return start, shift

    def next_mask(self):
        """The 2D attention mask of the next decoding step (one more column, seen by every slot: a
        free slot attends to its own dummy token rather than to nothing)."""
        self.mask[:, self.length] = True
        return self.mask[:, self.base:self.length + 1]

    def adopt(self, out) -> None:
        """After a decoding step: the model wrote the new column into our layers in place."""
        self.length += 1

    def select(self, keep) -> None:
        """Keep only the slots `keep` (a LongTensor), in that order."""
        self._repack(keep, 0)
        self.batch = len(keep)

    def trim(self, starts: list[int]) -> int:
        """Before a step: attention skips the leading columns no live slot uses (a view moves); when
        the buffers are full, the live columns move to new buffers with room to grow. Returns how
        many columns the buffers' contents moved left (callers shift their starts by it)."""
        import torch

        cut = min(starts)
        if self.length + 1 <= self.mask.shape[1]:
            self._set_base(cut)
            return 0
        self._repack(torch.arange(self.batch, device=self.mask.device), cut)
        return cut

    def _set_base(self, base: int) -> None:
        self.base = base
        for layer in self.cache.layers:
            layer.set_buffers(layer.kbuf, layer.vbuf, self.length, base)

    def _allocate(self, kv: list[tuple], width: int) -> None:
        import torch

        capacity = width + self.headroom
        for layer, (k, v) in zip(self.cache.layers, kv):
            kbuf = k.new_zeros((self.batch, k.shape[1], capacity, k.shape[3]))
            vbuf = v.new_zeros((self.batch, v.shape[1], capacity, v.shape[3]))
            layer.set_buffers(kbuf, vbuf, width)
        self.mask = torch.zeros((self.batch, capacity), dtype=torch.bool, device=kv[0][0].device)
        self.length, self.base = width, 0

    def _repack(self, keep, cut: int, shift: int = 0) -> None:
        """New buffers holding slots `keep`, columns [cut, length) moved to [shift, ...), with room for
        `headroom` more columns."""
        live = self.length - cut
        capacity = shift + live + self.headroom
        base = max(self.base - cut, 0) + shift
        for layer in self.cache.layers:
            kbuf = layer.kbuf.new_zeros((len(keep), layer.kbuf.shape[1], capacity, layer.kbuf.shape[3]))
            vbuf = layer.vbuf.new_zeros((len(keep), layer.vbuf.shape[1], capacity, layer.vbuf.shape[3]))
            kbuf[:, :, shift:shift + live] = layer.kbuf[keep, :, cut:self.length]
            vbuf[:, :, shift:shift + live] = layer.vbuf[keep, :, cut:self.length]
            layer.set_buffers(kbuf, vbuf, shift + live, base)
        mask = self.mask.new_zeros((len(keep), capacity))
        mask[:, shift:shift + live] = self.mask[keep, cut:self.length]
        self.mask, self.length, self.base = mask, shift + live, base


class _PlainStore:
    """The model's own cache, for caches `_SlotStore` does not handle: rows are decoded in waves (no
    refill), finished rows are still dropped from the batch when the cache supports it."""

    refill = False

    def __init__(self, model):
        self.model, self.cache, self.mask, self.batch = model, None, None, 0

    def prefill_cache(self):
        return _new_cache(self.model)

    def adopt(self, out) -> None:
        cache = _output_cache(out)
        self.cache = self.cache if cache is None else cache

    def place_batch(self, prefilled, att, which: list[int]) -> None:
        """Adopt a prefilled batch cache as the new wave (rows `which` of it, repeats allowed)."""
        import torch

        if which != list(range(att.shape[0])):
            prefilled.batch_select_indices(torch.as_tensor(which, device=att.device))
        self.cache, self.mask, self.batch = prefilled, att[which], len(which)

    def next_mask(self):
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self.mask

    def select(self, keep) -> None:
        self.cache.batch_select_indices(keep.to(self.mask.device))
        self.mask, self.batch = self.mask[keep], len(keep)

    def trim(self, starts: list[int]) -> int:
        return 0


# ----------------------------------------------------------------------------- the decoding loop


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


# Model types whose causal-LM forward is exactly `lm_head(decoder(...).last_hidden_state)`: no logit
# scaling or soft-capping in between (which `_split_head` would skip).
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _split_head(model):
    """(decoder, head weight) when the sampler may apply the output head itself, else None.

    Why: on a CPU, MKL's fp32 GEMM runs the output head (49k x 576 for SmolLM2) about 30% faster as
    `W @ h^T` than as F.linear's `h @ W^T` for the 32-128 rows of a decoding batch (measured, one
    thread, AVX2: 65 vs 93 ms at 32 rows), 5-9% of a whole decoding step. Only for a plain model on
    the CPU: a transformers causal LM of a type in `_PLAIN_HEAD_TYPES`, fp32, with a bias-free
    `nn.Linear` head and no hooks on it (a hook, e.g. a test that biases the logits, must run).
    """
    import torch

    if not type(model).__module__.startswith("transformers.models."):
        return None  # a PEFT wrapper, a custom class: its own forward
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES or hasattr(model, "hf_device_map"):
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or head._forward_hooks or head._forward_pre_hooks:
        return None
    if head.weight.dtype != torch.float32 or head.weight.device.type != "cpu" or model._forward_hooks:
        return None
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if decoder is None or decoder is model:
        return None
    return decoder, head.weight


def _last_logits_fn(model, vocab: int):
    """A function (input_ids, attention_mask, position_ids, cache) -> (model output, fp32 logits of
    the last position [rows, vocab]), the output head applied to that position only; padded
    embedding columns past `vocab` are never computed or are cut off."""
    split = _split_head(model)
    if split is None:
        cache_arg, keep = _forward_kwargs(model)

        def run(input_ids, attention_mask, position_ids, cache):
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=True, **{cache_arg: cache}, **keep)
            return out, out.logits[:, -1, :vocab].float()

        return run
    decoder, weight = split
    cache_arg, _ = _forward_kwargs(decoder)  # the decoder returns hidden states: no logits to keep
    head = weight[:vocab]

    def run(input_ids, attention_mask, position_ids, cache):
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{cache_arg: cache})
        return out, _head_logits(head, out.last_hidden_state[:, -1])

    return run


# Vocabulary rows of the output head per product in `_head_logits`: each [rows, batch] block is still in
# cache when it is transposed into place.
_HEAD_BLOCK = 1024


def _head_logits(head, hidden):
    """`hidden @ head.T` ([rows, V]) computed as `head @ hidden.T` (MKL's faster layout at a decoding
    batch) one block of vocabulary rows at a time, each block transposed into place while it is in
    cache: one whole-vocabulary transpose afterwards costs ~13 ms a step at batch 64 (a 12.6 MB copy
    with a cache-hostile stride)."""
    import torch

    out = torch.empty((hidden.shape[0], head.shape[0]), dtype=hidden.dtype, device=hidden.device)
    hidden_t = hidden.t()
    for i in range(0, head.shape[0], _HEAD_BLOCK):
        out[:, i:i + _HEAD_BLOCK] = (head[i:i + _HEAD_BLOCK] @ hidden_t).t()
    return out


def _left_pad(seqs: list[list[int]], pad_id: int, device):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
        att[r, width - len(s):] = 1
    return ids.to(device), att.to(device)


def _decode(model, tokenizer, prompt_ids: list[list[int]], seeds: list[int], temperature: list[float],
            top_p: list[float], *, max_new_tokens: int, eos: set[int], pad_id: int, slots: int,
            plain: bool = False, on_step: Callable[[int], None] | None = None,
            on_row: Callable[[int, Completion], None] | None = None,
            stop_ids: set[int] | None = None) -> list[Completion]:
    """Decode every row to EOS or `max_new_tokens`, `slots` rows at a time.

    A row that samples a token of `stop_ids` keeps it and stops there, unfinished (a search that
    grows a trace one step, one line, at a time).

    Rows wait in a queue, longest prompt first. A row enters with a prefill forward of its prompt
    (several entering rows share one), which also gives its first token; it then decodes one token
    per step with the other live rows, and leaves as soon as it ends: its slot goes to the next
    waiting row, or, once the queue is empty, the batch shrinks. No step computes a finished row
    for long. `plain=True` forces the fallback store (tests compare both).
    """
    import torch

    device = next(model.parameters()).device
    vocab = len(tokenizer)
    forward = _last_logits_fn(model, vocab)
    rows = len(prompt_ids)
    store = None if plain else _SlotStore.create(model, slots, headroom=max_new_tokens + 64)
    store = store or _PlainStore(model)
    eos_t = torch.tensor(sorted(eos), device=device)
    temps = torch.tensor(temperature, dtype=torch.float32, device=device)
    tops = torch.tensor(top_p, dtype=torch.float32, device=device)

    # longest prompt first, identical prompts next to each other (they share a prefill)
    queue = deque(sorted(range(rows), key=lambda r: (-len(prompt_ids[r]), prompt_ids[r], r)))
    generated: list[list[int]] = [[] for _ in range(rows)]
    logprob_sums = [0.0] * rows
    results: list[Completion | None] = [None] * rows
    prefill_tokens = max(_PREFILL_TOKENS, max(len(p) for p in prompt_ids))

    state = _Slots(0, max_new_tokens, pad_id, device)

    def uniforms(r: int):
        if temperature[r] <= 0:
            return torch.zeros(max_new_tokens)
        return torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(seeds[r]))

    def finish(r: int, finished: bool) -> None:
        count = len(generated[r]) + (1 if finished else 0)
        comp = Completion(text=tokenizer.decode(generated[r], skip_special_tokens=False), num_tokens=count,
                          mean_logprob=logprob_sums[r] / count if count else 0.0, finished=finished,
                          token_ids=generated[r])
        results[r] = comp
        if on_row is not None:
            on_row(r, comp)

    def record(rs: list[int], tokens, logits) -> list[bool]:
        """Book the chosen tokens of rows `rs`; True where the row goes on."""
        # log_softmax is one fused pass on a CPU (logsumexp takes ~1.6x as long at [64, 49152])
        chosen = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0].tolist()
        ended = torch.isin(tokens, eos_t).tolist()
        going = []
        for r, tok, lp, end in zip(rs, tokens.tolist(), chosen, ended):
            logprob_sums[r] += lp
            if end:
                finish(r, True)
            else:
                generated[r].append(tok)
                if len(generated[r]) >= max_new_tokens or (stop_ids and tok in stop_ids):
                    finish(r, False)
            going.append(results[r] is None)
        return going

    # Prompts prefilled for rows still waiting (the other samples of a problem): their keys, values and
    # last logits, kept until the last row using them has entered, so a prompt is computed once.
    waiting = Counter(tuple(p) for p in prompt_ids)
    saved: dict[tuple, tuple[list, object]] = {}

    def prefill(keys: list[tuple]):
        ids, att = _left_pad([list(k) for k in keys], pad_id, device)
        cache = store.prefill_cache()
        out, last = forward(ids, att, (att.cumsum(-1) - 1).clamp(min=0), cache)
        return (cache if cache is not None else _output_cache(out)), att, last

    def admit(free: list[int]) -> None:
        """Prefill waiting rows into free slots, longest prompt first, several prompts per forward.
        Rows with the same prompt (the samples of one problem) share one prefill."""
        nonlocal state
        take, fresh = [], {}
        widest = len(prompt_ids[queue[0]])  # longest first: the first row is the widest of the group
        while queue and len(take) < len(free):
            key = tuple(prompt_ids[queue[0]])
            if key not in saved and key not in fresh:
                if fresh and widest * (len(fresh) + 1) > prefill_tokens:
                    break
                fresh[key] = len(fresh)
            take.append(queue.popleft())
        keys = [tuple(prompt_ids[r]) for r in take]
        if fresh:
            cache, att, last = prefill(list(fresh))
            if not store.refill:  # the prefilled batch becomes the wave's cache
                state = _Slots(len(take), max_new_tokens, pad_id, device)
                store.place_batch(cache, att, [fresh[k] for k in keys])
            for key, i in fresh.items():
                width = len(key)
                kv = ([(layer.keys[i:i + 1, :, -width:].clone(), layer.values[i:i + 1, :, -width:].clone())
                       for layer in cache.layers] if store.refill else [])
                saved[key] = (kv, last[i])
            del cache
        logits = torch.stack([saved[k][1] for k in keys])
        us = torch.stack([uniforms(r) for r in take]).to(device)
        idx = torch.as_tensor(take, device=device)
        tokens = pick_tokens(logits, temps[idx], tops[idx], us[:, 0])
        going = record(take, tokens, logits)
        if on_step is not None:
            on_step(len(take))
        for key in keys:
            waiting[key] -= 1
        if store.refill:
            free = iter(free)
            for key in dict.fromkeys(keys):  # each prompt of this admission, in order
                rows = [i for i, k in enumerate(keys) if k == key and going[i]]
                if rows:
                    dest = [next(free) for _ in rows]
                    start, shift = store.place(dest, saved[key][0])
                    if shift:
                        state.start = [x + shift for x in state.start]
                    w = torch.as_tensor(rows, device=device)
                    state.fill(dest, [take[i] for i in rows], [start] * len(rows), tokens[w],
                               torch.full((len(rows),), len(key), device=device), us[w])
                if not waiting[key]:
                    del saved[key]
        else:
            state.fill(list(range(len(take))), take, [0] * len(take), tokens,
                       torch.as_tensor([len(k) for k in keys], device=device), us)
            ended = [i for i, g in enumerate(going) if not g]
            state.step(None, tokens, ended, advance=False)
            saved.clear()  # a wave's prompts live in its batch cache

    if store.refill:
        state = _Slots(slots, max_new_tokens, pad_id, device)
    with torch.inference_mode():
        while queue or state.live():
            free = state.free()
            if queue and (free if store.refill else not state.live()):
                admit(free if store.refill else list(range(slots)))
                continue
            live = state.live()
            if len(live) < state.size and 4 * len(live) <= 3 * state.size and (not queue or not store.refill):
                keep_t = torch.as_tensor(live, device=device)
                store.select(keep_t)
                state.select(live, keep_t)
                live = list(range(len(live)))
            cut = store.trim([state.start[s] for s in live])
            if cut:
                state.start = [x - cut for x in state.start]
            out, logits = forward(state.tok[:, None], store.next_mask(), state.pos[:, None], store.cache)
            store.adopt(out)
            lv = None if len(live) == state.size else torch.as_tensor(live, device=device)
            if lv is not None:
                logits = logits[lv]
            rs = [state.row[s] for s in live]
            idx = torch.as_tensor(rs, device=device)
            tokens = pick_tokens(logits, temps[idx], tops[idx], state.uniform(lv))
            going = record(rs, tokens, logits)
            state.step(lv, tokens, [s for s, g in zip(live, going) if not g])
            if on_step is not None:
                on_step(len(live))
    return results  # type: ignore[return-value]


class _Slots:
    """Per-slot decoding state: which row, its next input token and position, how many tokens it has
    made (its index into its uniforms), and the column its live part starts at."""

    def __init__(self, n: int, max_new_tokens: int, pad_id: int, device):
        import torch

        self.size, self.max_new_tokens = n, max_new_tokens
        self.row, self.start = [-1] * n, [0] * n
        self.tok = torch.full((n,), pad_id, dtype=torch.long, device=device)
        self.pos = torch.zeros(n, dtype=torch.long, device=device)
        self.made = torch.zeros(n, dtype=torch.long, device=device)
        self.u = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)

    def live(self) -> list[int]:
        return [s for s, r in enumerate(self.row) if r >= 0]

    def free(self) -> list[int]:
        return [s for s, r in enumerate(self.row) if r < 0]

    def fill(self, slots: list[int], rows: list[int], starts: list[int], tokens, positions, uniforms) -> None:
        import torch

        d = torch.as_tensor(slots, device=self.tok.device)
        self.tok[d], self.pos[d], self.made[d], self.u[d] = tokens, positions, 1, uniforms
        for s, r, c in zip(slots, rows, starts):
            self.row[s], self.start[s] = r, c

    def uniform(self, lv):
        made = self.made if lv is None else self.made[lv]
        u = self.u if lv is None else self.u[lv]
        return u.gather(-1, made.clamp(max=self.max_new_tokens - 1)[:, None])[:, 0]

    def step(self, lv, tokens, ended: list[int], advance: bool = True) -> None:
        """Book a decoding step: next inputs, positions and draw indices move on; `ended` slots free."""
        if advance:
            if lv is None:
                self.tok, self.made = tokens, self.made + 1
            else:
                self.tok[lv], self.made[lv] = tokens, self.made[lv] + 1
            self.pos = self.pos + 1
        for s in ended:
            self.row[s] = -1

    def select(self, live: list[int], keep) -> None:
        self.size = len(live)
        self.row, self.start = [self.row[s] for s in live], [self.start[s] for s in live]
        self.tok, self.pos, self.made, self.u = self.tok[keep], self.pos[keep], self.made[keep], self.u[keep]


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


# ----------------------------------------------------------------------------- public API


def _per_row(value, rows: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * rows
    values = [float(v) for v in value]
    if len(values) != rows:
        raise DistillError(f"{name}: {len(values)} values for {rows} rows")
    return values


def generate_rows(model, tokenizer, prompt_ids: list[list[int]], seeds: list[int], *, temperature,
                  top_p, max_new_tokens: int, batch_size: int | None = None, batch_tokens: int | None = None,
                  on_step: Callable[[int], None] | None = None,
                  on_row: Callable[[int, Completion], None] | None = None, plain: bool = False,
                  stop_ids: set[int] | None = None) -> list[Completion]:
    """One completion per (token ids, seed) row, in input order; the building block of the batched APIs.
    `stop_ids`: tokens after which a row stops, unfinished (the token kept).

    `temperature` and `top_p` are one value or one per row (0 = greedy). Rows decode together up to
    `decode_capacity(...)` at a time with continuous refill. `on_step(n)` gets the tokens made by each
    forward, `on_row(i, completion)` each row as soon as it ends.
    """
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise DistillError("an empty prompt cannot be continued; every prompt needs at least one token")
    pad_id = tokenizer.pad_token_id
    eos = eos_ids(model, tokenizer)
    if pad_id is None:
        pad_id = min(eos)
    slots = decode_capacity([len(p) for p in prompt_ids], max_new_tokens, batch_size=batch_size,
                            batch_tokens=batch_tokens)
    return _decode(model, tokenizer, prompt_ids, list(seeds), _per_row(temperature, len(prompt_ids), "temperature"),
                   _per_row(top_p, len(prompt_ids), "top_p"), max_new_tokens=max_new_tokens, eos=eos,
                   pad_id=pad_id, slots=slots, plain=plain, on_step=on_step, on_row=on_row, stop_ids=stop_ids)


def sample_completions(model, tokenizer, prompts: list[str], *, num_samples: int = 1, temperature: float = 0.0,
                       top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0, batch_size: int | None = None,
                       batch_tokens: int | None = None, greedy: bool = False, stats: GenerationStats | None = None,
                       on_row: Callable[[int, Completion], None] | None = None,
                       take: Callable[[list], list] | None = None):
    """Sample `num_samples` completions for each prompt text (already chat-templated).

    `temperature=0` is greedy. Returns one list per prompt, in sample order. Each (prompt, sample)
    row draws from its own seeded generator, so results do not depend on the batch beyond float
    rounding. With `greedy=True` one greedy completion per prompt is decoded in the same batches
    and the result is `(greedy, sampled)`: `greedy[p]` a Completion, `sampled` as above (empty lists
    when num_samples is 0). `stats` (if given) accumulates tokens and seconds; `on_row(i, c)` is
    called as each completion ends (progress bars).

    The prompts are decoded in fixed chunks of about `CHUNK_BATCHES` batches of rows (one chunk when
    they fit), each chunk the same way in any process: `take` picks this process's share of the
    chunks (`distill.ranks.Ranks.take`) and the completions of the other chunks are left None, for
    the caller to gather; together the processes get exactly a one-process run's completions.
    """
    check_settings(num_samples=num_samples if not greedy or num_samples else 1, temperature=temperature, top_p=top_p,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, batch_tokens=batch_tokens)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    each = num_samples + (1 if greedy else 0)
    capacity = decode_capacity([len(e) for e in encoded for _ in range(each)], max_new_tokens,
                               batch_size=batch_size, batch_tokens=batch_tokens)
    per_chunk = max(1, capacity * CHUNK_BATCHES // max(each, 1))
    chunks = [list(range(i, min(i + per_chunk, len(prompts)))) for i in range(0, len(prompts), per_chunk)]
    mine = chunks if take is None else take(chunks)
    rows, comps = [], []
    t0 = time.perf_counter()
    for chunk in mine:
        part = [(p, s) for p in chunk for s in range(num_samples)] + ([(p, -1) for p in chunk] if greedy else [])
        base = len(rows)
        rows += part
        comps += generate_rows(model, tokenizer, [encoded[p] for p, _ in part],
                               [row_seed(seed, prompts[p], max(s, 0)) for p, s in part],
                               temperature=[0.0 if s < 0 else temperature for _, s in part],
                               top_p=[1.0 if s < 0 else top_p for _, s in part], max_new_tokens=max_new_tokens,
                               batch_size=capacity,
                               on_row=None if on_row is None else (lambda i, c, base=base: on_row(base + i, c)))
    if stats is not None:
        stats.seconds += time.perf_counter() - t0
        stats.completions += len(rows)
        stats.new_tokens += sum(c.num_tokens for c in comps)
        stats.prompts += sum(len(c) for c in mine)
    sampled: list[list[Completion | None]] = [[None] * num_samples for _ in prompts]
    firsts: list[Completion | None] = [None] * len(prompts)
    for (p, s), c in zip(rows, comps):
        if s < 0:
            firsts[p] = c
        else:
            sampled[p][s] = c
    return (firsts, sampled) if greedy else sampled


def estimate_seconds(model, tokenizer, prompts: list[str], *, rows_per_prompt: int, max_new_tokens: int,
                     batch_size: int | None = None, batch_tokens: int | None = None, steps: int = 4) -> dict:
    """How long sampling `rows_per_prompt` completions of <= `max_new_tokens` for every prompt takes
    here: an upper bound (every completion at full length), from a short calibration on this model.

    The calibration decodes one full batch (the first prompts, each with its rows) for `steps` tokens
    and times the prefill and the decoding steps apart; the estimate is the unique prompt tokens at the
    measured prefill rate plus the completion tokens at the measured per-step batch rate.
    """
    import torch

    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = len(prompts) * rows_per_prompt
    capacity = decode_capacity([len(e) for e in encoded for _ in range(rows_per_prompt)], max_new_tokens,
                               batch_size=batch_size, batch_tokens=batch_tokens)
    n_prompts = max(1, min(len(prompts), -(-capacity // rows_per_prompt)))
    sample = [e for e in encoded[:n_prompts] for _ in range(rows_per_prompt)][:capacity]
    marks: list[float] = []
    t0 = time.perf_counter()
    generate_rows(model, tokenizer, sample, list(range(len(sample))), temperature=1.0, top_p=1.0,
                  max_new_tokens=steps + 1, batch_size=capacity, on_step=lambda n: marks.append(time.perf_counter()))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prefill_s = max(marks[0] - t0, 1e-6)
    prefill_rate = sum(len(e) for e in encoded[:n_prompts]) / prefill_s
    step_s = (marks[-1] - marks[0]) / max(len(marks) - 1, 1)
    decode_rate = len(sample) / step_s if step_s > 0 else float("inf")
    prompt_tokens = sum(len(e) for e in encoded)
    seconds = prompt_tokens / prefill_rate + rows * max_new_tokens / decode_rate
    return {"seconds": seconds, "rows": rows, "batch": capacity, "prefill_tokens_per_s": prefill_rate,
            "decode_tokens_per_s": decode_rate, "calibration_s": time.perf_counter() - t0}


def check_settings(*, num_samples: int, temperature: float, top_p: float, max_new_tokens: int,
                   batch_size: int | None, batch_tokens: int | None = None) -> None:
    if num_samples < 1:
        raise DistillError(f"--samples must be at least 1 (got {num_samples})")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise DistillError(f"--temperature must be >= 0 (got {temperature}); 0 means greedy")
    if not (0 < top_p <= 1):
        raise DistillError(f"--top-p must be in (0, 1] (got {top_p})")
    if max_new_tokens < 1:
        raise DistillError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if batch_size is not None and batch_size < 1:
        raise DistillError(f"--batch-size must be at least 1 (got {batch_size})")
    if batch_tokens is not None and batch_tokens < 1:
        raise DistillError(f"--batch-tokens must be at least 1 (got {batch_tokens})")


def newline_ids(tokenizer) -> set[int]:
    """The tokens whose text contains a newline: where a line-by-line step ends."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
    return {i for i, t in enumerate(texts) if "\n" in t}
