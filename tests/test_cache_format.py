"""Writer -> reader -> collate round trip on synthetic samples, and the reader's refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.cache.format import FORMAT_VERSION, Manifest, read_manifest, tokenizer_fingerprint
from distill.cache.reader import CacheDataset, CacheReader, collate, split_indices
from distill.cache.writer import CachedSample, CacheWriter, trained_positions
from distill.errors import DistillError


def _manifest(n, k=4, vocab=320, value_dtype="fp16"):
    return Manifest(
        teacher={"name": "synthetic"}, tokenizer_fingerprint="sha256:abc", tokenizer_length=vocab,
        logits_width=vocab, pad_id=0, k=k, temperature=1.0, value_dtype=value_dtype,
        id_dtype="uint16" if vocab <= 65536 else "int32", num_samples=n, data={"fingerprint": "x"},
    )


def _samples(n, k=4, vocab=320, seed=0):
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(g.integers(2, 12))
        ids = g.integers(0, vocab, L)
        mask = np.zeros(L, np.uint8)
        mask[int(g.integers(0, L)):] = 1
        R = len(trained_positions(mask))
        tid = torch.from_numpy(g.integers(0, vocab, (R, k)))
        lp = torch.sort(torch.log_softmax(torch.randn(R, vocab), -1)[:, :k], -1, descending=True).values
        out.append(CachedSample(ids, mask, tid, lp))
    return out


def _write(tmp_path, samples, shard=3, **kw):
    m = _manifest(len(samples), **kw)
    w = CacheWriter(tmp_path / "c", m)
    for j, start in enumerate(range(0, len(samples), shard)):
        w.write_shard(j, start, samples[start:start + shard])
    w.finish()
    return tmp_path / "c"


@pytest.mark.parametrize("value_dtype", ["fp16", "bf16"])
def test_roundtrip_and_collate(tmp_path, value_dtype):
    samples = _samples(7)
    path = _write(tmp_path, samples, value_dtype=value_dtype)
    r = CacheReader(path)
    assert len(r) == 7 and r.manifest.complete and r.manifest.format_version == FORMAT_VERSION
    tol = 1e-2 if value_dtype == "bf16" else 1e-3
    for i, s in enumerate(samples):
        got = r[i]
        assert got["input_ids"].tolist() == list(s.input_ids)
        assert torch.equal(got["target_ids"], s.ids)
        assert torch.allclose(got["target_logprobs"], s.logprobs, atol=tol, rtol=tol)
    batch = collate([r[1], r[4], r[6]], pad_id=0)
    T = max(len(samples[i].input_ids) for i in (1, 4, 6))
    assert batch["input_ids"].shape == (3, T) and batch["target_ids"].shape == (3, T, 4)
    assert batch["target_logprobs"].dtype == torch.float32 and batch["targets"].dtype == torch.int64
    for b, i in enumerate((1, 4, 6)):
        s = samples[i]
        L = len(s.input_ids)
        assert batch["attention_mask"][b].sum() == L
        pos = trained_positions(s.loss_mask)
        expect = torch.full((T,), -100)
        expect[pos] = torch.as_tensor(s.input_ids[pos + 1])
        assert torch.equal(batch["targets"][b], expect)
        assert torch.equal(batch["target_ids"][b, pos], s.ids)
        untrained = batch["targets"][b] == -100
        assert (batch["target_ids"][b][untrained] == 0).all() and (batch["target_logprobs"][b][untrained] == 0).all()
    ds = CacheDataset(r, indices=[5, 2])
    assert len(ds) == 2 and ds[0]["index"] == 5
    tr, ev = split_indices(10, 0.2)
    assert len(ev) == 2 and sorted(tr + ev) == list(range(10))


def test_reader_refusals(tmp_path):
    path = _write(tmp_path, _samples(4))
    with pytest.raises(DistillError, match="another tokenizer"):
        CacheReader(path, expect_fingerprint="sha256:other")
    with pytest.raises(DistillError, match="top-4"):
        CacheReader(path, expect_k=8)
    assert CacheReader(path, expect_k=2)[0]["target_ids"].shape[1] == 2
    man = json.loads((path / "manifest.json").read_text())
    for key, value, msg in [("codec", "sampled-v9", "codec"), ("format_version", FORMAT_VERSION + 1, "upgrade")]:
        bad = dict(man, **{key: value})
        (path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(DistillError, match=msg):
            read_manifest(path)
    bad = dict(man)
    bad["shards"] = [dict(man["shards"][0], file="../../etc/passwd")]
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(DistillError, match="invalid shard"):
        CacheReader(path)


def test_incomplete_cache_refused(tmp_path):
    samples = _samples(6)
    w = CacheWriter(tmp_path / "c", _manifest(6))
    w.write_shard(0, 0, samples[:3])
    with pytest.raises(DistillError, match="incomplete"):
        CacheReader(tmp_path / "c")
    assert len(CacheReader(tmp_path / "c", allow_incomplete=True)) == 3


def test_tokenizer_fingerprint_stable_and_discriminating(tiny_tok):
    from helpers import tiny_tokenizer

    fp = tokenizer_fingerprint(tiny_tok)
    tiny_tok("some text", truncation=True, max_length=3)  # runtime state must not change it
    assert tokenizer_fingerprint(tiny_tok) == fp
    other = tiny_tokenizer()
    other.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(other) != fp
    assert tokenizer_fingerprint(tiny_tokenizer(vocab_size=300)) != fp
