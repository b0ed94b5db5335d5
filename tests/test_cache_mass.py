"""`cache verify`'s bound on the top-k probability mass: what rounding to fp16/bf16 can produce, no more.

Real caches (tiny model; SmolLM2 when installed) pass in both dtypes; a cache whose values were shifted to
sum to 1.03 (checksums rewritten, so that only the mass check can see it) is refused; and the bound
k^u * (1 + slack) holds for the rows most exposed to rounding (near-uniform top-k holding ~all the mass).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

import cli
from distill.cache.verify import FP32_SLACK, UNIT_ROUNDOFF, max_topk_mass, verify_cache
from distill.errors import DistillError
from teachers.cache_build import build_cache

RECORDS = [{"prompt": f"Q{i}: what is {i} + {i}?", "completion": f" {i} + {i} = {2 * i}. The answer is {2 * i}."}
           for i in range(6)]


def _row_masses(cache) -> np.ndarray:
    from distill.cache.reader import CacheReader

    reader = CacheReader(cache)
    rows = [reader[i]["target_logprobs"].double() for i in range(len(reader))]
    return torch.cat(rows).exp().sum(1).numpy()


def test_bound_values():
    assert max_topk_mass(64, "bf16") == pytest.approx(64 ** (2 ** -8) * (1 + FP32_SLACK))
    assert 1.0163 < 64 ** UNIT_ROUNDOFF["bf16"] < 1.0164 and 1.0020 < 64 ** UNIT_ROUNDOFF["fp16"] < 1.0021
    assert max_topk_mass(64, "bf16") < 1.02 and max_topk_mass(64, "fp16") < 1.004


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_rounding_never_exceeds_the_bound(dtype):
    """The rows where rounding pushes the sum up the most: k near-equal probabilities holding all the
    mass (the maximiser of the derivation), rounded as the writer rounds them."""
    g = torch.Generator().manual_seed(0)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16
    for k in (2, 8, 64, 512):
        logits = torch.randn(4096, k, generator=g, dtype=torch.float64) * 0.05
        lp = torch.log_softmax(logits, dim=1).float()
        stored = lp.to(torch_dtype).double()
        mass = stored.exp().sum(1)
        assert float(mass.max()) <= max_topk_mass(k, dtype), (k, float(mass.max()))
        assert float(mass.max()) <= k ** UNIT_ROUNDOFF[dtype] + 1e-12


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_real_tiny_caches_pass(tmp_path, tiny_model_dir, dtype):
    for k in (4, 64, 319):  # 319: all but one token of the 320-token vocabulary
        out = tmp_path / f"{dtype}-{k}"
        build_cache(str(tiny_model_dir), None, out, top_k=k, dtype=dtype, records=RECORDS, progress=False, log=lambda m: None)
        verify_cache(out)
        assert _row_masses(out).max() <= max_topk_mass(k, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_real_smollm2_caches_pass(tmp_path, smollm2_dir, dtype):
    out = tmp_path / dtype
    build_cache(str(smollm2_dir), None, out, top_k=64, dtype=dtype, records=RECORDS, max_length=96,
                progress=False, log=lambda m: None)
    verify_cache(out)
    masses = _row_masses(out)
    assert masses.max() <= max_topk_mass(64, dtype)
    assert masses.max() > 0.99  # some rows put ~all the mass in the top-64: the bound is exercised


def _rewrite_one_row(cache, target_mass: float) -> float:
    """Shift the log-probs of one row of shard 0 so that its probabilities sum to `target_mass`, and
    rewrite the shard's sha256 and size in the manifest: only the mass check can catch it."""
    from safetensors.torch import load_file, save

    manifest = json.loads((cache / "manifest.json").read_text())
    entry = manifest["shards"][0]
    shard = cache / entry["file"]
    tensors = load_file(str(shard))
    vals = tensors["topk_logprobs"]
    v = vals.double()
    mass = v.exp().sum(1)
    # a row whose largest probability stays below 1 after the shift (values must stay <= 0)
    row = int(torch.nonzero(v[:, 0].exp() / mass * target_mass < 0.9)[0])
    v[row] += math.log(target_mass / float(mass[row]))
    tensors["topk_logprobs"] = v.to(vals.dtype).contiguous()
    blob = save(tensors)
    shard.write_bytes(blob)
    entry.update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return float(tensors["topk_logprobs"][row].double().exp().sum())


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_mass_past_rounding_is_refused(tmp_path, tiny_model_dir, dtype, capsys):
    for k in (4, 64):
        out = tmp_path / f"{dtype}-{k}"
        build_cache(str(tiny_model_dir), None, out, top_k=k, dtype=dtype, records=RECORDS, progress=False, log=lambda m: None)
        stored_mass = _rewrite_one_row(out, 1.03)
        assert 1.02 < stored_mass < 1.05  # 1.03 up to bf16 rounding
        with pytest.raises(DistillError, match="sum to 1.0[2-5]"):
            verify_cache(out)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli.main(["cache", "verify", str(out)])
        err = capsys.readouterr().err
        assert exc.value.code == 1 and len(err.strip().splitlines()) == 1 and "shard-r00-00000" in err
