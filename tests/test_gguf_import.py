"""The real SmolLM2 teacher: GGUF import to a plain model dir, then a small cache built and verified."""

from __future__ import annotations

import json

import pytest
import torch

from distill.cache.reader import CacheReader, collate
from distill.cache.verify import verify_cache
from distill.errors import DistillError
from teachers.cache_build import build_cache
from teachers.gguf_import import import_gguf


def test_import_gguf_bad_inputs(tmp_path):
    with pytest.raises(DistillError, match="not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(DistillError, match="not a .gguf"):
        import_gguf(tmp_path / "model.bin", tmp_path / "out")
    (tmp_path / "broken.gguf").write_bytes(b"not really gguf")
    with pytest.raises(DistillError, match="GGUF file .*broken.gguf does not load"):
        import_gguf(tmp_path / "broken.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_import_builds_and_verifies_a_cache(tmp_path, smollm2_dir):
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["vocab_size"] == 49152
    records = [
        {"messages": [{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "The capital of France is Paris."}]},
        {"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": "1, 2, 3, 4,", "completion": " 5, 6, 7"},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "cache"
    man = build_cache(str(smollm2_dir), data, out, top_k=16, max_length=128, progress=False, log=lambda m: None)
    assert man.complete and man.id_dtype == "uint16" and man.tokenizer_length == 49152
    verify_cache(out)
    reader = CacheReader(out, expect_fingerprint=man.tokenizer_fingerprint, expect_k=16)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    # known answers: the teacher's top-1 after "The capital of France is" is " Paris"; after "4," it is " 5"
    s = reader[1]
    assert tok.decode(s["target_ids"][0, 0]).strip() == "Paris"
    assert s["target_logprobs"][0, 0] > -1.0
    s = reader[2]  # SmolLM2 splits " 5" into " " + "5": rows 0 and 1 predict those two tokens
    assert tok.decode(s["target_ids"][:2, 0]) == " 5"
    batch = collate([reader[i] for i in range(3)], pad_id=reader.manifest.pad_id)
    trained = batch["targets"] != -100
    top1_agree = (batch["target_ids"][..., 0][trained] == batch["targets"][trained]).float().mean()
    assert top1_agree > 0.6  # the teacher mostly predicts its own canonical answers
    assert torch.isfinite(batch["target_logprobs"]).all()


def test_one_import_parses_the_gguf_file_once():
    """transformers reads config, tokenizer and weights from the file separately; inside one import
    they share one parse (the parse walks the whole vocabulary), and nothing stays patched after."""
    import gguf

    from conftest import require_smollm2
    from distill.models.gguf import _parse_once
    from teachers.gguf_import import smollm2_gguf_path

    require_smollm2()
    original = gguf.GGUFReader
    with _parse_once():
        first = gguf.GGUFReader(smollm2_gguf_path())
        assert gguf.GGUFReader(smollm2_gguf_path()) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is original
