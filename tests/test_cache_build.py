"""Cached top-k ids / log-probs / tail mass equal a dense fp32 recomputation, and the position convention holds."""

from __future__ import annotations

import json

import pytest
import torch

from distill.cache.reader import CacheDataset, CacheReader, collate
from distill.cache.verify import verify_cache
from distill.data.records import tokenize_record
from helpers import tiny_llama, tiny_tokenizer
from teachers.cache_build import build_cache, length_batches

RECORDS = [
    {"prompt": "Tom has 3 apples and buys 4 more.", "completion": " 3 + 4 = 7. The answer is 7."},
    {"prompt": "What is 15 minus 8?", "completion": " Let me think step by step. 15 - 8 = 7."},
    {"prompt": "Sara reads", "completion": " 20 pages each night."},
    {"text": "0 1 2 3 4 5 6 7 8 9 10"},
    {"messages": [{"role": "user", "content": "A baker makes 12 loaves a day."}, {"role": "assistant", "content": "12 * 5 = 60"}]},
    {"prompt": "The store sells pens for $2 each. Ten pens cost", "completion": " $20."},
]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _save(model, tok, directory):
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def padded_teacher_dir(tmp_path_factory):
    """Logits wider than the tokenizer (384 vs 320) whose padded columns dominate: any leak shows."""
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3, pad_vocab_to=384)
    V = len(tok)
    with torch.no_grad():  # +-20x copies of real rows: for every hidden state some padded logit is huge
        w = model.lm_head.weight
        w[V:V + 32] = 20 * w[:32]
        w[V + 32:V + 64] = -20 * w[:32]
    return _save(model, tok, tmp_path_factory.mktemp("padded_teacher"))


def _check_against_dense(cache, teacher_dir, records, temperature, max_length=64):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    V = len(tok)
    reader = CacheReader(cache)
    m = reader.manifest
    assert m.tokenizer_length == V and m.logits_width == model.lm_head.weight.shape[0]
    k = m.k
    tails = []
    for i, rec in enumerate(records):
        ids, mask = tokenize_record(tok, rec, max_length)
        s = reader[i]
        assert s["input_ids"].tolist() == ids and s["loss_mask"].int().tolist() == mask
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        dense = torch.log_softmax(logits[:, :V] / temperature, dim=-1)
        pos = [t for t in range(len(ids) - 1) if mask[t + 1]]
        assert s["positions"].tolist() == pos and s["target_ids"].shape == (len(pos), k)
        d = dense[pos]
        dvals, dids = d.topk(k, dim=-1)
        cvals, cids = s["target_logprobs"], s["target_ids"]
        # values at the cached ids equal the dense log-probs (fp16 rounding only)
        assert torch.allclose(d.gather(1, cids), cvals, atol=2e-3, rtol=1e-3)
        # the cached ids are the top-k (exactly, where the dense values are not near-ties)
        assert torch.allclose(cvals, dvals, atol=2e-3, rtol=1e-3)
        gaps = (dvals[:, :-1] - dvals[:, 1:]).min(dim=1).values > 1e-4
        assert torch.equal(cids[gaps], dids[gaps])
        assert (cids < V).all()
        # tail mass = 1 - sum of the top-k probabilities, against the dense fp32 one
        tail_dense = 1 - dvals.exp().sum(-1)
        tail_cache = 1 - cvals.exp().sum(-1)
        assert torch.allclose(tail_cache, tail_dense, atol=2e-3)
        tails.append(tail_dense)
    tails = torch.cat(tails)
    assert m.mean_tail_mass == pytest.approx(tails.mean().item(), abs=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cache_equals_dense_recomputation(tmp_path, tiny_model_dir, temperature):
    data = _write_jsonl(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "cache"
    man = build_cache(str(tiny_model_dir), data, out, top_k=7, temperature=temperature, max_length=64,
                      batch_size=3, shard_size=4, progress=False, log=lambda m: None)
    assert man.complete and len(man.shards) == 2 and man.temperature == temperature
    assert [s.file for s in man.shards] == ["shard-r00-00000.safetensors", "shard-r00-00001.safetensors"]
    verify_cache(out)
    _check_against_dense(out, tiny_model_dir, RECORDS, temperature)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_padded_logits_are_excluded(tmp_path, padded_teacher_dir, temperature):
    data = _write_jsonl(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "cache"
    man = build_cache(str(padded_teacher_dir), data, out, top_k=5, temperature=temperature, max_length=64,
                      dtype="bf16", batch_size=2, progress=False, log=lambda m: None)
    assert man.logits_width == 384 and man.tokenizer_length == 320 and man.value_dtype == "bf16"
    verify_cache(out)
    reader = CacheReader(out)
    for i in range(len(reader)):
        assert (reader[i]["target_ids"] < 320).all()
    # bf16 keeps ~3 significant digits: looser tolerance than fp16
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(padded_teacher_dir, dtype=torch.float32).eval()
    tok = tiny_tokenizer()
    for i, rec in enumerate(RECORDS):
        ids, mask = tokenize_record(tok, rec, 64)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        s = reader[i]
        dense = torch.log_softmax(logits[s["positions"], :320] / temperature, -1)
        assert torch.allclose(dense.gather(1, s["target_ids"]), s["target_logprobs"], atol=3e-2, rtol=1e-2)
        # the padded columns really dominate the full-width softmax, so including them would show
        assert logits[s["positions"], 320:].max(-1).values.min() > logits[s["positions"], :320].max(-1).values.max()
        assert torch.allclose(s["target_logprobs"], dense.topk(5).values, atol=3e-2, rtol=1e-2)


@pytest.fixture(scope="module")
def successor_teacher_dir(tmp_path_factory):
    """A model whose answer is known: from token v at position t it predicts f(v) = (v + 1) % V.

    One layer whose attention and MLP outputs are zero, one-hot embeddings, and an lm_head that maps
    e_v to a large logit on f(v). The entry at position t must therefore peak at f(input_ids[t]).
    """
    tok = tiny_tokenizer()
    V = len(tok)
    model = tiny_llama(tok, seed=0, hidden_size=V, num_layers=1)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(V))
        head = torch.zeros(V, V)
        head[(torch.arange(V) + 1) % V, torch.arange(V)] = 1.0
        model.lm_head.weight.copy_(head)
    return _save(model, tok, tmp_path_factory.mktemp("succ_teacher"))


def test_position_convention_with_known_answer(tmp_path, successor_teacher_dir):
    data = _write_jsonl(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "cache"
    build_cache(str(successor_teacher_dir), data, out, top_k=3, max_length=64, batch_size=4, progress=False, log=lambda m: None)
    reader = CacheReader(out)
    V = reader.manifest.tokenizer_length
    batch = collate([reader[i] for i in range(len(reader))], pad_id=reader.manifest.pad_id)
    trained = batch["targets"] != -100
    assert trained.sum() > 20
    ids = batch["input_ids"]
    # targets are already shifted: targets[b, t] = input_ids[b, t+1]
    assert torch.equal(batch["targets"][:, :-1][trained[:, :-1]], ids[:, 1:][trained[:, :-1]])
    assert not trained[:, -1].any()
    # the top-1 entry at t is the teacher's prediction from token t: f(input_ids[t]), with probability ~1
    top1 = batch["target_ids"][..., 0]
    assert torch.equal(top1[trained], (ids[trained] + 1) % V)
    assert (batch["target_logprobs"][..., 0][trained] > -0.05).all()
    # and neither neighbour's prediction (an off-by-one would produce those)
    shifted = torch.zeros_like(ids)
    shifted[:, :-1] = (ids[:, 1:] + 1) % V
    differs = trained & (ids != torch.roll(ids, -1, dims=1))
    assert (top1[differs] != shifted[differs]).all()
    # untrained positions carry no teacher data
    assert (batch["target_ids"][~trained] == 0).all() and (batch["target_logprobs"][~trained] == 0).all()
    assert len(CacheDataset(reader, indices=[0, 2])) == 2


def test_truncation_is_counted(tmp_path, tiny_model_dir):
    data = _write_jsonl(tmp_path / "d.jsonl", RECORDS)
    msgs = []
    man = build_cache(str(tiny_model_dir), data, tmp_path / "c", top_k=4, max_length=8, progress=False, log=msgs.append)
    tok = tiny_tokenizer()
    from distill.data.records import encode_record

    longer = sum(len(encode_record(tok, r)[0]) > 8 for r in RECORDS)
    assert longer > 0 and man.build["truncated_samples"] == longer
    assert any("truncated" in m for m in msgs)
    assert all(len(CacheReader(tmp_path / "c")[i]["input_ids"]) <= 8 for i in range(len(RECORDS)))


def test_length_batches_limits():
    lengths = [5, 50, 7, 49, 3, 20]
    batches = length_batches(lengths, batch_size=2, batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) <= 2 and len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1
    assert batches[0] == [1, 3]


def test_row_scorer_fast_path_equals_full_logits(tiny_model_dir, padded_teacher_dir):
    """Scoring trained rows through hidden states + the model head equals slicing the full logits."""
    from transformers import AutoModelForCausalLM

    from teachers.backends.hf import RowScorer

    tok = tiny_tokenizer()
    seqs = [tokenize_record(tok, r, 64)[0] for r in RECORDS[:3]]
    positions = [list(range(2, len(s) - 1)) for s in seqs]
    for d in (tiny_model_dir, padded_teacher_dir):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        scorer = RowScorer(model, seqs[0], tok.pad_token_id, "cpu")
        assert scorer.fast
        fast_ids, fast_lp = scorer.topk(seqs, positions, len(tok), 6, 2.0)
        scorer.fast = False
        full_ids, full_lp = scorer.topk(seqs, positions, len(tok), 6, 2.0)
        assert torch.allclose(fast_lp, full_lp, atol=1e-5)
        assert (fast_ids == full_ids).float().mean() > 0.99


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_teacher_builds(tmp_path, quant):
    """4/8-bit teacher loading (bitsandbytes, CPU here) builds a sound cache and records the quantization."""
    from helpers import save_tiny_model

    tiny_model_dir = save_tiny_model(tmp_path / "t64", hidden_size=64)  # bnb's CPU NF4 kernel needs >= 64
    data = _write_jsonl(tmp_path / "d.jsonl", RECORDS[:3])
    man = build_cache(str(tiny_model_dir), data, tmp_path / "c", top_k=4, quant=quant, progress=False, log=lambda m: None)
    assert man.teacher["quant"] == quant and man.complete
    verify_cache(tmp_path / "c")
    from distill.errors import DistillError

    with pytest.raises(DistillError, match="different teacher"):
        build_cache(str(tiny_model_dir), data, tmp_path / "c", top_k=4, progress=False, log=lambda m: None)
