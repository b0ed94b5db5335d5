"""The codec seam: the registry refuses unknown names in one line (build and readers alike), a codec's
encode/decode round trip, and version-1 caches still read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save

import cli
from distill.cache.codecs import CODECS, get_codec
from distill.cache.format import mmap_safetensors
from distill.cache.reader import CacheReader
from distill.cache.verify import verify_cache
from distill.errors import DistillError


def _maps(tensors: dict[str, torch.Tensor], tmp_path, name="s.safetensors"):
    path = tmp_path / name
    path.write_bytes(save(tensors))
    return mmap_safetensors(path)


def _one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_registry_refuses_unknown_codec_in_one_line():
    with pytest.raises(DistillError) as err:
        get_codec("zstd-magic", {}, vocab_size=100)
    msg = str(err.value)
    assert "\n" not in msg and "zstd-magic" in msg and all(name in msg for name in CODECS)


def test_build_refuses_unknown_codec_in_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "completion": " A"}) + "\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["cache", "build", "--teacher", str(tmp_path / "none"), "--data", str(data), "--out",
                  str(tmp_path / "c"), "--codec", "zstd-magic", "--no-progress"])
    line = _one_line(capsys.readouterr().err)
    assert exc.value.code == 1 and "zstd-magic" in line and "topk" in line
    assert not (tmp_path / "c").exists()  # refused before anything was written


def _write_topk_cache(tmp_path, *, k=4, vocab=50, n=3):
    from distill.cache.format import Manifest
    from distill.cache.writer import CachedSample, CacheWriter, trained_positions

    g = np.random.default_rng(0)
    samples = []
    for _ in range(n):
        ids = g.integers(0, vocab, 6)
        mask = np.array([0, 0, 1, 1, 1, 1], np.uint8)
        R = len(trained_positions(mask))
        lp = torch.sort(torch.log_softmax(torch.randn(R, vocab), -1), -1, descending=True)
        samples.append(CachedSample(ids, mask, lp.indices[:, :k], lp.values[:, :k]))
    m = Manifest(teacher={"name": "x"}, tokenizer_fingerprint="sha256:x", tokenizer_length=vocab, logits_width=vocab,
                 pad_id=0, k=k, temperature=1.0, value_dtype="fp16", id_dtype="uint16", num_samples=n, data={})
    w = CacheWriter(tmp_path / "c", m)
    w.write_shard(0, 0, samples)
    w.finish()
    return tmp_path / "c", samples


def test_reader_and_verify_refuse_a_codec_they_do_not_know_in_one_line(tmp_path, capsys):
    path, _ = _write_topk_cache(tmp_path)
    man = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(dict(man, codec="sampled-v9")))
    for fn in (CacheReader, verify_cache):
        with pytest.raises(DistillError) as err:
            fn(path)
        assert "\n" not in str(err.value) and "sampled-v9" in str(err.value) and "upgrade distill" in str(err.value)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["cache", "info", str(path)])
    assert "sampled-v9" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("value_dtype,tol", [("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)])
def test_topk_round_trip(tmp_path, value_dtype, tol):
    V, k, R = 1000, 8, 37
    codec = get_codec("topk", {"k": k, "value_dtype": value_dtype}, vocab_size=V)
    lp_full = torch.log_softmax(torch.randn(R, V, generator=torch.Generator().manual_seed(1)) * 3, -1)
    vals, ids = lp_full.topk(k, dim=-1)
    tensors, tail = codec.encode({"ids": ids, "logprobs": vals})
    assert set(tensors) == set(codec.tensor_names)
    assert tail == pytest.approx(float((1 - vals.exp().sum(-1)).sum()), rel=1e-5)
    maps = _maps(tensors, tmp_path)
    codec.verify(maps, R)
    dec = codec.open(maps).decode(5, 20)
    assert dec.weights is None and dec.valid is None
    assert torch.equal(dec.ids, ids[5:20])
    assert ((dec.logprobs - vals[5:20]).abs() <= tol * vals[5:20].abs() + 1e-12).all()
    assert torch.equal(codec.open(maps).decode(5, 20, width=3).ids, ids[5:20, :3])
    assert codec.bytes_per_row() == k * (2 + 2)


def test_version_1_cache_still_reads(tmp_path):
    """A cache written before the codec seam (format 1: no codec_params, no codec_bytes) reads and verifies."""
    path, samples = _write_topk_cache(tmp_path)
    man = json.loads((path / "manifest.json").read_text())
    man["format_version"] = 1
    man.pop("codec_params")
    for s in man["shards"]:
        s.pop("codec_bytes")
    (path / "manifest.json").write_text(json.dumps(man))
    verify_cache(path)
    r = CacheReader(path)
    assert r.codec.name == "topk" and r.codec.k == 4
    assert torch.equal(r[1]["target_ids"], samples[1].ids)


def test_cache_settings_offer_exactly_the_codec_value_dtypes():
    """`distill cache build --dtype` lists its choices without importing torch; they must be the codecs' own."""
    from distill.cache.codecs.values import VALUE_DTYPES
    from teachers.cache_settings import VALUE_DTYPE_CHOICES

    assert tuple(VALUE_DTYPE_CHOICES) == tuple(VALUE_DTYPES)
