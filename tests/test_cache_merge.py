"""`distill cache merge`: caches of data slices merge into the cache of the whole data, and nothing else merges."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cli import main
from distill.cache.merge import merge_caches
from distill.cache.reader import CacheReader
from distill.cache.verify import verify_cache
from distill.errors import DistillError
from teachers.cache_build import build_cache

RECORDS = [
    {"prompt": f"Q{i}: {i} plus {i + 3}?", "completion": f" {i} + {i + 3} = {2 * i + 3}." + " Done." * (i % 3)}
    for i in range(17)
]


def _build(out, records, *, teacher, shard_size=4, top_k=5, temperature=1.0, dtype="fp16", pack_ids=False):
    return build_cache(str(teacher), None, out, records=records, top_k=top_k, temperature=temperature,
                       max_length=48, shard_size=shard_size, batch_size=3, dtype=dtype, device="cpu",
                       pack_ids=pack_ids, progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def slices(tmp_path_factory, tiny_model_dir):
    """Caches of records 0-6 (shards of 4), 7-16 (shards of 3) and of all 17 in one go (shards of 5)."""
    root = tmp_path_factory.mktemp("merge")
    _build(root / "a", RECORDS[:7], teacher=tiny_model_dir, shard_size=4)
    _build(root / "b", RECORDS[7:], teacher=tiny_model_dir, shard_size=3)
    _build(root / "whole", RECORDS, teacher=tiny_model_dir, shard_size=5)
    return root


def test_merged_cache_equals_the_cache_of_the_concatenated_data(tmp_path, slices):
    out = tmp_path / "c"
    merged = merge_caches([slices / "a", slices / "b"], out)
    verify_cache(out)
    whole, got = CacheReader(slices / "whole"), CacheReader(out)
    assert len(got) == len(whole) == 17
    for i in range(17):
        x, y = got[i], whole[i]
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), (i, key)
    assert merged.data["fingerprint"] == whole.manifest.data["fingerprint"]
    assert merged.num_tokens == whole.manifest.num_tokens and merged.num_rows == whole.manifest.num_rows
    # per-shard sums are fp32 and the two caches cut the rows into shards differently
    assert abs(merged.mean_tail_mass - whole.manifest.mean_tail_mass) < 1e-6
    # renumbered: A's two shards then B's four, sample ranges back to back, bytes untouched
    assert [(s.index, s.start, s.end) for s in merged.shards] == [
        (0, 0, 4), (1, 4, 7), (2, 7, 10), (3, 10, 13), (4, 13, 16), (5, 16, 17)]
    a = json.loads((slices / "a" / "manifest.json").read_text())["shards"]
    assert [s.sha256 for s in merged.shards[:2]] == [s["sha256"] for s in a]
    assert not [p for p in tmp_path.iterdir() if p.name != "c"]  # no temporary folder left


def test_merge_cli_and_refusals(tmp_path, slices, tiny_model_dir, tiny_student_dir, capsys):
    def run(*args):
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        return exc.value.code, capsys.readouterr()

    code, outs = run("cache", "merge", str(slices / "b"), str(slices / "a"), "--out", str(tmp_path / "ba"))
    assert code == 0 and "2 caches" in outs.out
    assert [s.start for s in CacheReader(tmp_path / "ba").manifest.shards][:4] == [0, 3, 6, 9]

    other_k = tmp_path / "k4"
    _build(other_k, RECORDS[:3], teacher=tiny_model_dir, top_k=4)
    other_t = tmp_path / "t2"
    _build(other_t, RECORDS[:3], teacher=tiny_model_dir, temperature=2.0)
    other_teacher = tmp_path / "student"
    _build(other_teacher, RECORDS[:3], teacher=tiny_student_dir)
    packed = tmp_path / "packed"  # same codec, k and dtypes; its ids are bit-packed: other bytes
    _build(packed, RECORDS[:3], teacher=tiny_model_dir, pack_ids=True)
    capsys.readouterr()  # the builds' loading bars
    for bad, word in ((other_k, "different k"), (other_t, "different temperature"),
                      (other_teacher, "different teacher"), (packed, "different codec params")):
        code, outs = run("cache", "merge", str(slices / "a"), str(bad), "--out", str(tmp_path / "no"))
        lines = [line for line in outs.err.strip().splitlines() if "kernels" not in line]
        assert code == 1 and len(lines) == 1 and word in lines[0], outs.err
        assert not (tmp_path / "no").exists()
    with pytest.raises(DistillError, match="not empty"):
        merge_caches([slices / "a", slices / "b"], slices / "whole")
    with pytest.raises(DistillError, match="twice"):
        merge_caches([slices / "a", slices / "a"], tmp_path / "aa")
    manifest = json.loads((slices / "b" / "manifest.json").read_text())
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for s in manifest["shards"]:
        os.link(slices / "b" / s["file"], incomplete / s["file"])
    (incomplete / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    with pytest.raises(DistillError, match="incomplete"):
        merge_caches([slices / "a", incomplete], tmp_path / "ai")
