"""The decoding engine: continuous batching (finished rows leave, waiting rows take their slots),
shared prefills for identical prompts, an exact top-p nucleus, per-row randomness independent of the
batch, and the same results from the preallocated slot cache and the model's own cache."""

from __future__ import annotations

import pytest
import torch

from distill.models.sampling import (
    _draw,
    decode_capacity,
    estimate_seconds,
    format_prompt,
    generate_rows,
    pick_tokens,
    sample_completions,
)
from helpers import tiny_llama, tiny_tokenizer

QUESTIONS = ["What is 2 + 2?", "Tom has 3 apples and buys 4 more. How many apples does he have?", "x",
             "A baker makes 12 loaves", "Sara reads 20 pages each night. After 6 nights"]


@pytest.fixture(scope="module")
def model_tok():
    tok = tiny_tokenizer()
    return tiny_llama(tok, seed=0), tok


def _encoded(tok, copies=1):
    return [tok(format_prompt(tok, q, "sys"), add_special_tokens=False)["input_ids"] for q in QUESTIONS] * copies


class _Forwards:
    """Records (batch rows, query length) of every forward of the model."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.embed_tokens.register_forward_hook(
            lambda m, args, out: self.calls.append(tuple(args[0].shape)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_slot_cache_plain_cache_and_batch_sizes_agree(model_tok):
    """Long completions (the slot cache trims and grows), rows ending at many lengths, a batch of 3
    refilled 37 times, one batch of all rows, and the fallback store: the same tokens."""
    model, tok = model_tok
    rows = _encoded(tok, copies=8)
    kw = dict(temperature=1.3, top_p=0.97, max_new_tokens=150)
    seeds = list(range(len(rows)))
    small = generate_rows(model, tok, rows, seeds, batch_size=3, **kw)
    whole = generate_rows(model, tok, rows, seeds, batch_size=len(rows), **kw)
    plain = generate_rows(model, tok, rows, seeds, batch_size=3, plain=True, **kw)
    ids = lambda cs: [c.token_ids for c in cs]  # noqa: E731
    assert ids(small) == ids(whole) == ids(plain)
    assert [c.mean_logprob for c in small] == pytest.approx([c.mean_logprob for c in whole], abs=1e-4)
    lengths = {c.num_tokens for c in small}
    assert any(c.finished for c in small) and max(lengths) == 150 and min(lengths) < 100


def test_finished_rows_stop_costing_compute(model_tok):
    """Decoding work (rows x steps over all forwards) stays close to the tokens actually generated,
    instead of every row running to the longest row's end."""
    model, tok = model_tok
    rows = _encoded(tok, copies=8)
    eos = tok.eos_token_id

    def likelier_eos(module, args, out):  # completions end after ~30 tokens, some far later
        out = out.clone()
        out[..., eos] += 2.3
        return out

    hook = model.lm_head.register_forward_hook(likelier_eos)
    try:
        with _Forwards(model) as fw:
            comps = generate_rows(model, tok, rows, list(range(len(rows))), temperature=1.0, top_p=1.0,
                                  max_new_tokens=150, batch_size=8)
    finally:
        hook.remove()
    decoded = sum(b for b, t in fw.calls if t == 1)
    generated = sum(c.num_tokens for c in comps)
    rows_to_longest = sum(max(c.num_tokens for c in comps[i:i + 8]) * 8 for i in range(0, len(comps), 8))
    assert decoded <= 1.25 * generated
    assert 2 * generated < rows_to_longest  # what fixed batches would have computed


def test_samples_of_one_prompt_share_its_prefill(model_tok):
    model, tok = model_tok
    prompts = [format_prompt(tok, q, "sys") for q in QUESTIONS]
    unique = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    for batch_size in (2, 40):  # the samples enter together, or one by one as slots free up
        with _Forwards(model) as fw:
            sample_completions(model, tok, prompts, num_samples=4, temperature=1.0, max_new_tokens=6,
                               batch_size=batch_size, greedy=True)
        prefilled = sum(b * t for b, t in fw.calls if t > 1)
        assert prefilled <= unique * 1.5  # padding only, never a second copy of a prompt


def test_greedy_and_samples_in_one_pool_match_separate_calls(model_tok):
    model, tok = model_tok
    prompts = [format_prompt(tok, q, "sys") for q in QUESTIONS]
    kw = dict(top_p=0.9, max_new_tokens=12, seed=3, batch_size=4)
    greedy, sampled = sample_completions(model, tok, prompts, num_samples=3, temperature=0.8, greedy=True, **kw)
    alone_greedy = sample_completions(model, tok, prompts, num_samples=1, temperature=0.0, **kw)
    alone_sampled = sample_completions(model, tok, prompts, num_samples=3, temperature=0.8, **kw)
    assert [g.token_ids for g in greedy] == [row[0].token_ids for row in alone_greedy]
    assert [[c.token_ids for c in row] for row in sampled] == [[c.token_ids for c in row] for row in alone_sampled]


def _nucleus_probs(logits, top_p):
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()


@pytest.mark.parametrize("scale,top_p", [(8.0, 0.9), (0.05, 0.9), (0.05, 1.0), (3.0, 0.5)])
def test_draws_follow_the_top_p_nucleus_exactly(scale, top_p):
    """Uniforms on a fine grid through the inverse CDF reproduce the nucleus probabilities to 1/N,
    whether the nucleus lies within the first 64 candidates (peaked) or far past them (flat)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, generator=g) * scale
    n = 20000
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    tokens = _draw(logits.expand(n, -1).contiguous(), torch.full((n,), top_p), u)
    freq = torch.bincount(tokens, minlength=1000).float() / n
    expected = _nucleus_probs(logits, top_p)
    assert torch.all(freq[expected == 0] == 0)
    assert (freq - expected).abs().max() <= 2.0 / n
    if scale < 1:
        assert int((expected > 0).sum()) > 64  # the wide case really needed the full sort


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(6, 50)
    temps = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0, 2.0])
    tokens = pick_tokens(logits, temps, torch.full((6,), 0.9), torch.rand(6))
    assert tokens[temps == 0].tolist() == logits.argmax(-1)[temps == 0].tolist()


def test_capacity_is_sized_in_tokens():
    assert decode_capacity([100] * 500, 156, batch_tokens=32768) == 128
    assert decode_capacity([1000] * 500, 24, batch_tokens=32768) == 32
    assert decode_capacity([100] * 5, 156, batch_tokens=32768) == 5  # never more than the rows
    assert decode_capacity([100] * 500, 156, batch_size=7) == 7
    assert decode_capacity([5000], 100, batch_tokens=1024) == 1  # at least one row


def test_estimate_is_an_upper_bound_of_the_real_run(model_tok):
    import time

    model, tok = model_tok
    prompts = [format_prompt(tok, q, "sys") for q in QUESTIONS]
    est = estimate_seconds(model, tok, prompts, rows_per_prompt=3, max_new_tokens=24, batch_size=8)
    assert est["rows"] == 15 and est["batch"] == 8 and est["seconds"] > 0
    assert est["prefill_tokens_per_s"] > 0 and est["decode_tokens_per_s"] > 0
    t0 = time.perf_counter()
    sample_completions(model, tok, prompts, num_samples=3, temperature=1.0, max_new_tokens=24, batch_size=8)
    assert time.perf_counter() - t0 < 20 * est["seconds"] + 5  # same order of magnitude (shared machine)


def test_attention_reads_only_columns_of_live_rows(model_tok):
    """One slot refilled row after row: each decoding step's keys span the live row's prompt and
    completion only, not the columns the rows before it left behind (the old store kept those until
    64+ of them had piled up, and every step's attention read them)."""
    model, tok = model_tok
    rows = _encoded(tok)
    widths = []
    attn = model.model.layers[0].self_attn

    def keys_read(module, args, kwargs, out):  # (query length, key columns attention just read)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        widths.append((kwargs["hidden_states"].shape[1], cache.layers[0].keys.shape[-2]))

    hook = attn.register_forward_hook(keys_read, with_kwargs=True)
    try:
        comps = generate_rows(model, tok, rows, list(range(len(rows))), temperature=1.0, top_p=1.0,
                              max_new_tokens=40, batch_size=1)
    finally:
        hook.remove()
    decode_widths = [w for q, w in widths if q == 1]
    assert len(decode_widths) == sum(c.num_tokens - 1 for c in comps) and len(comps) > 1
    assert max(decode_widths) <= max(len(r) + c.num_tokens for r, c in zip(rows, comps))


def test_sampler_head_matches_the_models_logits(model_tok):
    """The sampler applies a plain output head itself (a faster GEMM layout on CPUs): the logits are the
    model's own up to float rounding, and a hook on the head (or a non-plain model) keeps the model's path."""
    from distill.models.sampling import _last_logits_fn, _split_head

    model, tok = model_tok
    assert _split_head(model) is not None
    ids = torch.as_tensor(_encoded(tok)[:1])
    att, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    with torch.inference_mode():
        _, ours = _last_logits_fn(model, len(tok))(ids, att, pos, None)
        theirs = model(input_ids=ids).logits[:, -1, :len(tok)]
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    hook = model.lm_head.register_forward_hook(lambda m, a, out: out)
    try:
        assert _split_head(model) is None
    finally:
        hook.remove()


@pytest.mark.parametrize("block", [7, 1024, 10**6])
def test_head_blocks_give_the_dense_product(block, monkeypatch):
    """The head is applied a block of vocabulary rows at a time: any block size, a last partial block
    included, gives `hidden @ W.T` of the whole vocabulary."""
    import distill.models.sampling as sampling

    monkeypatch.setattr(sampling, "_HEAD_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    head, hidden = torch.randn(2053, 24, generator=g), torch.randn(5, 24, generator=g)
    ours = sampling._head_logits(head, hidden)
    assert ours.shape == (5, 2053) and ours.is_contiguous()
    assert torch.allclose(ours, hidden @ head.t(), atol=1e-5, rtol=1e-5)
