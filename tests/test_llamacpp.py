"""GGUF exports in the real llama.cpp runtime (llama-cpp-python): same token ids, same greedy tokens,
next-token log-probs within the GGUF type's rounding of what transformers computes.

Deselected by default (pyproject addopts `-m 'not llamacpp'`): llama-cpp-python is an optional extra
built from source. Run with scripts/check_llamacpp.sh, which installs it and runs `pytest -m llamacpp`.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_gemma3, tiny_llama, tiny_qwen2, tiny_spm_tokenizer, tiny_tokenizer
from students.export_gguf import write_gguf

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module", autouse=True)
def llama_cpp_installed():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: run scripts/check_llamacpp.sh (pip install -e '.[gguf-check]')")


def _prompts(tok):
    chat = tok.apply_chat_template([{"role": "user", "content": "Tom has 13 apples and buys 4 more."}], tokenize=False,
                                   add_generation_prompt=True)
    return [chat, "Question: what is 120 + 305? <think>", "Sara reads 20 pages  each night, café.\n\nAfter 6 nights"]


# Each architecture with a tokenizer of some family's pre-tokenization (llama.cpp must split the
# text the same way): llama + smollm digits, qwen2 + its split regex and NFC, gemma3 + gpt-2, and
# the SentencePiece-style byte-fallback vocabulary (Gemma's kind) on gemma3 and llama.
CASES = {"llama": (lambda tok: tiny_llama(tok, hidden_size=64), "smollm"), "qwen2": (tiny_qwen2, "qwen2"),
         "gemma3": (tiny_gemma3, "gpt-2"), "gemma3-spm": (tiny_gemma3, "spm"),
         "llama-spm": (lambda tok: tiny_llama(tok, hidden_size=64), "spm")}


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_tiny_students_run_in_llamacpp(tmp_path, arch, kind):
    """f32 isolates the layout (Q/K permutation, biases, (1 + w) norms, sliding window, tied head):
    llama.cpp then differs from transformers by float summation order only (measured <= 3e-4)."""
    from students.gguf_check import compare

    build, pre = CASES[arch]
    tok = tiny_spm_tokenizer() if pre == "spm" else tiny_tokenizer(pre=pre)
    model = build(tok)
    summary = write_gguf(model, tok, tmp_path / "m.gguf", kind)
    assert summary["pre"] == ("default" if pre == "spm" else pre)
    res = compare(model, tok, tmp_path / "m.gguf", _prompts(tok), new_tokens=12)
    assert res["all_tokens_equal"], res["prompts"]
    assert res["all_greedy_equal"], res["prompts"]
    assert res["max_abs_logprob"] < (2e-3 if kind == "f32" else 5e-3), res
    # a random tiny model has near-tied logits: f16 rounding may flip the odd argmax (measured 0.992)
    assert res["top1"] >= (1.0 if kind == "f32" else 0.97)


@pytest.mark.slow
def test_smollm2_types_in_llamacpp(tmp_path, smollm2_dir):
    """The real SmolLM2-135M in f16, q8_0, q4_1 and q4_0 against transformers' fp32 model on 4 chat
    prompts + 16 greedy tokens. Bounds are ~2-3x the figures measured (benchmarks/bench_gguf.py; the
    table is in docs/training.md): loose enough for another CPU's kernels, far below what a layout or
    tokenizer error gives (several nats of KL, top-1 near 0)."""
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_gguf import measure

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    res = measure(model, tok, tmp_path, new_tokens=16, llamacpp=True)
    print(json.dumps({k: {x: y for x, y in v["llamacpp"].items() if x != "prompts"} for k, v in res.items()}, indent=1))
    cpp = {kind: res[kind]["llamacpp"] for kind in res}
    assert all(c["all_tokens_equal"] for c in cpp.values())
    f16, q8, q41, q40 = cpp["f16"], cpp["q8_0"], cpp["q4_1"], cpp["q4_0"]
    assert f16["all_greedy_equal"] and f16["max_abs_logprob"] < 0.15 and f16["kl_mean"] < 1e-4  # measured 0.038, 1.0e-5
    assert q8["greedy_token_agreement"] >= 0.6 and q8["top1"] >= 0.85 and q8["kl_mean"] < 0.02  # 0.88, 0.95, 6.4e-3
    # SmolLM2's packaged weights are Q4_1 already, so the q4_1 file holds them exactly: what is left
    # is llama.cpp's own 8-bit rounding of activations in its Q4_1 dot products (measured KL 4.1e-3).
    assert q41["all_greedy_equal"] and q41["top1"] >= 0.95 and q41["kl_mean"] < 0.015
    assert res["q4_1"]["transformers"]["kl_mean"] < 1e-6
    assert q40["top1"] >= 0.5 and q40["kl_mean"] < 1.5  # 0.66, 0.59
