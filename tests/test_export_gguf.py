"""GGUF export: llama, qwen2 and gemma3 students written with the `gguf` package load back in
`transformers` (`gguf_file=`) with the same logits (f32: exact, f16: near exact, q8_0 / q4_0:
measured KL and next-token agreement), the same tokenizer and chat template; other architectures
and tokenizers are refused in one line. The llama.cpp runtime check is tests/test_llamacpp.py."""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.errors import DistillError
from helpers import tiny_gemma3, tiny_llama, tiny_qwen2, tiny_spm_tokenizer, tiny_tokenizer
from students.export_gguf import agreement, write_gguf

TEXT = "Question: what is 12 + 30? <think>12 + 30 = 42.</think> The answer is 42.<|im_end|>"
BUILDERS = {"llama": lambda tok: tiny_llama(tok, hidden_size=64), "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_f32_round_trip_is_exact(tmp_path, tok, arch):
    """f32 stores the weights unrounded, so any difference is a layout error (the llama Q/K
    permutation, gemma's (1 + w) norms, a dropped bias or a wrong tied head)."""
    model = BUILDERS[arch](tok)
    summary = write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert summary["architecture"] == arch and summary["tokenizer"] == "gpt2" and summary["pre"] == "gpt-2"
    loaded, gtok = _load(tmp_path / "m.gguf")
    ids = torch.tensor([tok.encode(TEXT)])
    assert (_logprobs(loaded, ids) - _logprobs(model, ids)).abs().max().item() < 1e-4
    assert gtok.encode(TEXT) == tok.encode(TEXT)  # special and added tokens stay whole
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (arch == "llama")  # tiny llama is untied, qwen2/gemma3 tied
    assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id


def test_sentencepiece_style_vocabulary_for_gemma3(tmp_path):
    """A Gemma-style tokenizer (byte-fallback BPE over '▁' text, <0xNN> byte tokens, BOS added)
    becomes llama.cpp's `llama` vocabulary with merge-rank scores and BYTE-typed byte tokens."""
    tok = tiny_spm_tokenizer()
    model = tiny_gemma3(tok)
    summary = write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert summary["tokenizer"] == "llama"
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    vocab = tok.get_vocab()
    assert types[vocab["<0x0A>"]] == gguf.TokenType.BYTE and types[vocab["<unk>"]] == gguf.TokenType.UNKNOWN
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is False
    merged = [t for t in vocab if len(t) > 1 and not t.startswith("<") and scores[vocab[t]] < 0]
    assert merged and all(scores[vocab[t]] > -len(vocab) for t in merged)  # -rank of the merge that makes it
    loaded, gtok = _load(tmp_path / "m.gguf")
    text = "Question: what is 12 + 30?  <think>café</think><|im_end|>"
    assert gtok(text)["input_ids"] == tok(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    assert (_logprobs(loaded, ids) - _logprobs(model, ids)).abs().max().item() < 1e-4


def test_quantized_types_within_tolerance(tmp_path, tok):
    """f16 near exact; q8_0, q4_1 and q4_0 within a KL that grows with the rounding. The bounds are
    ~10x the values measured on this model (f16 ~1e-7, q8_0 ~1e-6, q4_x ~2e-4 nats per token)."""
    model = BUILDERS["llama"](tok)
    ids = torch.tensor([tok.encode(TEXT)])
    ref = _logprobs(model, ids)
    measured = {}
    for kind in ("f16", "q8_0", "q4_1", "q4_0"):
        summary = write_gguf(model, tok, tmp_path / f"{kind}.gguf", kind)
        measured[kind] = agreement(ref, _logprobs(_load(tmp_path / f"{kind}.gguf")[0], ids))
        reader = gguf.GGUFReader(str(tmp_path / f"{kind}.gguf"))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors are never rounded
        assert types["blk.0.ffn_up.weight"] == kind.upper()
        # q4_0 keeps the output head at Q8_0: its rounding error lands on every logit.
        assert types["output.weight"] == ("Q8_0" if kind.startswith("q4") else kind.upper())
        assert summary["tensor_types"][kind.upper()] >= 14
    assert measured["f16"]["max_abs_logprob"] < 2e-3 and measured["f16"]["top1"] == 1.0
    assert measured["q8_0"]["kl_mean"] < 2e-5 and measured["q8_0"]["top1"] == 1.0
    assert measured["q4_0"]["kl_mean"] < 3e-3 and measured["q4_1"]["kl_mean"] < 3e-3
    assert measured["f16"]["kl_mean"] < measured["q8_0"]["kl_mean"] < min(measured["q4_0"]["kl_mean"], measured["q4_1"]["kl_mean"])


def test_padded_vocab_and_user_tokens(tmp_path, tok):
    """Embedding rows beyond the tokenizer become UNUSED padding tokens; <think> (not special) is
    USER_DEFINED and <|im_end|> (special) CONTROL, as llama.cpp's converter marks them."""
    model = tiny_qwen2(tok, pad_vocab_to=len(tok) + 12)
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(tok) + 12 and tokens[-1] == f"[PAD{len(tok) + 11}]" and types[-1] == gguf.TokenType.UNUSED
    vocab = tok.get_vocab()
    assert types[vocab["<|im_end|>"]] == gguf.TokenType.CONTROL
    assert types[vocab["<think>"]] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
    loaded, _ = _load(tmp_path / "m.gguf")
    ids = torch.tensor([tok.encode(TEXT)])
    assert (_logprobs(loaded, ids) - _logprobs(model, ids)).abs().max().item() < 1e-4


def test_refusals_are_one_line(tmp_path, tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(DistillError, match="supports llama, qwen2 and gemma3") as err:
        write_gguf(gpt2, tok, tmp_path / "g.gguf", "f16")
    assert "\n" not in str(err.value)
    with pytest.raises(DistillError, match="--gguf-type"):
        write_gguf(tiny_llama(tok), tok, tmp_path / "g.gguf", "q3_k")
    from transformers import BertTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    bert_tok = BertTokenizerFast(tokenizer_object=wp, unk_token="[UNK]")
    with pytest.raises(DistillError, match="byte-level BPE"):
        write_gguf(tiny_llama(tok), bert_tok, tmp_path / "g.gguf", "f16")
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


@pytest.mark.slow
def test_smollm2_q8_0_matches(tmp_path, smollm2_dir):
    """The real SmolLM2-135M (30 layers, GQA 9/3 heads, tied 49k vocabulary) in q8_0."""
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    summary = write_gguf(model, tok, tmp_path / "smol.gguf", "q8_0")
    assert summary["tied_embeddings"] and summary["tokens"] == 49152
    loaded, gtok = _load(tmp_path / "smol.gguf")
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 7 times 8?"}], tokenize=False, add_generation_prompt=True)
    assert gtok.encode(chat) == tok.encode(chat)
    ids = torch.tensor([tok.encode(chat + "7 times 8 is 56.")])
    res = agreement(_logprobs(model, ids), _logprobs(loaded, ids))
    assert res["top1"] >= 0.95 and res["kl_mean"] < 5e-3, res


def test_export_run_writes_gguf_of_the_merged_student(kd_pair, tmp_path):
    """`distill export RUN --format gguf` = the fp32 merge (base + trained adapters) as one file: its
    logits match the merged safetensors export, and a wrong --out is one line."""
    import subprocess
    import sys
    from pathlib import Path

    from students.export import export_run
    from students.train import TrainConfig, train

    _, student, cache = kd_pair
    run = tmp_path / "run"
    train(TrainConfig(student=str(student), cache=str(cache), out=str(run), quant="nf4", lora_r=8, lora_alpha=16,
                      lora_dropout=0.0, lr=3e-2, steps=3, batch_size=8, eval_every=0, save_every=0, progress=False))
    merged = AutoModelForCausalLM.from_pretrained(export_run(run, tmp_path / "merged", format="merged", dtype="fp32")["out"])
    repo = Path(__file__).resolve().parents[1]
    cli = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "export", str(run), "--format", "gguf",
                          "--gguf-type", "f16", "--out", str(tmp_path / "student-f16.gguf")], cwd=repo, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "exported llama GGUF (f16" in cli.stdout
    loaded, _ = _load(tmp_path / "student-f16.gguf")
    tok = AutoTokenizer.from_pretrained(str(student))
    ids = torch.tensor([tok.encode(TEXT)])
    res = agreement(_logprobs(merged, ids), _logprobs(loaded, ids))
    assert res["max_abs_logprob"] < 2e-3 and res["top1"] == 1.0, res
    reader = gguf.GGUFReader(str(tmp_path / "student-f16.gguf"))
    assert "forward-kl" in reader.fields["general.description"].contents()
    with pytest.raises(DistillError, match="must name the .gguf file"):
        export_run(run, tmp_path / "somedir", format="gguf")
    with pytest.raises(DistillError, match="already exists"):
        export_run(run, tmp_path / "student-f16.gguf", format="gguf", gguf_type="f16")
