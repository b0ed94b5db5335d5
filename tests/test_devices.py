"""Compute dtypes on the CPU: bf16 / fp16 only where the CPU has the instructions (else fp32, ~3x faster
than the emulation), storage dtypes untouched."""

from __future__ import annotations

import pytest
import torch

from distill.models import cpu_compute_dtype, cpu_native_half, load_model
from helpers import tiny_llama, tiny_tokenizer

AVX2_EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile avx512_fp16\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd fphp asimdhp bf16 i8mm\n"


@pytest.mark.parametrize("text,bf16,fp16", [(AVX2_EPYC, False, False), (SAPPHIRE, True, True),
                                            (GRAVITON3, True, True), ("", False, False)])
def test_native_half_from_cpu_flags(text, bf16, fp16):
    assert cpu_native_half("bf16", text) is bf16
    assert cpu_native_half("fp16", text) is fp16


def test_cpu_compute_dtype_follows_this_cpu():
    native = cpu_native_half("bf16")
    assert cpu_compute_dtype(torch.bfloat16, "cpu", warn=False) == (torch.bfloat16 if native else torch.float32)
    assert cpu_compute_dtype(torch.float32, "cpu") == torch.float32
    assert cpu_compute_dtype(torch.bfloat16, "cuda", warn=False) == torch.bfloat16  # a GPU is left alone


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    out = tmp_path_factory.mktemp("bf16_model")
    tiny_llama(tok, seed=0).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_bf16_checkpoint_computes_in_fp32_where_bf16_is_emulated(bf16_model_dir):
    expected = torch.bfloat16 if cpu_native_half("bf16") else torch.float32
    for dtype in ("auto", "bf16"):
        model = load_model(bf16_model_dir, device="cpu", dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {expected}
    # loaded only to be re-saved: the checkpoint's dtype is kept
    kept = load_model(bf16_model_dir, device="cpu", dtype="auto", compute=False)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}


def test_4bit_layers_compute_in_fp32_where_bf16_is_emulated(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_model(tiny_model_dir, device="cpu", quant="nf4", dtype="bf16")
    dtypes = {m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert dtypes == {torch.bfloat16 if cpu_native_half("bf16") else torch.float32}
