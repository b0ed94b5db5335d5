"""Write a merged student as one GGUF file that llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs.

Why our own writer instead of llama.cpp's `convert_hf_to_gguf.py`: that script is not part of the
`gguf` package (it lives in the llama.cpp repository), and a student comes out of training as an
in-memory model. We use the `gguf` package's pieces -- `GGUFWriter`, the tensor-name maps
(`get_tensor_name_map`), the quantizers (`gguf.quants.quantize`) and `SpecialVocab` for merges,
special tokens and the chat template -- and reproduce the few model-specific transforms the
converter applies:

* llama: the rows of q_proj / k_proj are permuted from Hugging Face's rotate-half RoPE layout to the
  interleaved pairs that llama.cpp's llama graph rotates (transformers' GGUF loader undoes it).
  Llama-3 "llama3" RoPE scaling becomes the `rope_freqs` tensor, as the converter writes it.
* gemma3: RMSNorm weights are stored as (1 + w), because llama.cpp multiplies by the weight
  directly where Gemma multiplies by (1 + w); the per-layer sliding-window pattern and the local
  RoPE base are written so that a student with a subset of the teacher's layers keeps its pattern.
* tied embeddings: no `output.weight` tensor; llama.cpp then uses `token_embd` for the head.

Tensor types: 1-D tensors (norms, biases) stay F32, as llama.cpp's converter keeps them. `f16`
stores every matrix in F16; `q8_0` in Q8_0; `q4_0` / `q4_1` in Q4_0 / Q4_1 except the output head
(or the tied embedding, which is the head), kept in Q8_0 -- llama.cpp's own quantizer also keeps the head at
higher precision, because its error goes straight into every logit. A matrix whose rows are not a
multiple of the 32-value block falls back to F16.

Tokenizer: byte-level BPE (`tokenizer.ggml.model = gpt2`) with its merges, the pre-tokenizer named
from the tokenizer's own pre-tokenizer (gpt-2, smollm, qwen2, llama-bpe); or a SentencePiece-style
byte-fallback BPE (Gemma, Llama 2: `tokenizer.ggml.model = llama`) with merge-rank scores. Added
tokens are CONTROL (special) or USER_DEFINED, ids the model has but the tokenizer lacks UNUSED
padding, and the chat template goes along. Other tokenizers and architectures are refused in one line.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from distill.errors import DistillError

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_1", "q4_0")
# transformers model_type -> llama.cpp architecture name
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}

# Pre-tokenizer regexes (Hugging Face `Split` patterns) whose llama.cpp name we know.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_NAMES = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def _qtype(gguf_type: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[gguf_type]


def _file_type(gguf_type: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type]


def gguf_architecture(config) -> str:
    """llama.cpp's name for this model's architecture, or a one-line refusal."""
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if getattr(config, "model_type", None) == "gemma3":
        raise DistillError("GGUF export of gemma3 takes the text model (Gemma3ForCausalLM, model_type gemma3_text); "
                           "this student is the multimodal Gemma3ForConditionalGeneration")
    if arch is None:
        raise DistillError(f"GGUF export supports llama, qwen2 and gemma3 students, not {getattr(config, 'model_type', '?')!r}; "
                           "export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    return arch


# ------------------------------------------------------------------------------------------ rope

def _rope(config, layer_type: str | None = None) -> dict:
    """The rope parameters dict (transformers 5 `rope_parameters`, older `rope_theta` + `rope_scaling`)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if not isinstance(params, dict) or "rope_theta" not in params:
        legacy = dict(getattr(config, "rope_scaling", None) or {})
        legacy.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        params = legacy
    params = dict(params)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _llama3_rope_factors(rope: dict, head_dim: int):
    """Per-frequency divisors of Llama-3 RoPE scaling, as llama.cpp's converter computes them."""
    import numpy as np

    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (base ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _add_rope_scaling(writer, rope: dict, arch: str) -> None:
    import gguf

    kind = rope["rope_type"]
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return
    if kind == "yarn" and arch == "qwen2":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        return
    if kind == "llama3" and arch == "llama":
        return  # written as the rope_freqs tensor
    raise DistillError(f"GGUF export does not handle {kind!r} RoPE scaling on {arch}; export --format merged instead")


# ------------------------------------------------------------------------------------- metadata

def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _add_hparams(writer, config, arch: str, gguf_type: str) -> None:
    n_head, n_kv = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = _head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_file_type(gguf_type))
    if arch == "gemma3":
        _add_gemma3_hparams(writer, config, head_dim)
        return
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    _add_rope_scaling(writer, rope, arch)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "qwen2" and getattr(config, "use_sliding_window", False):
        raise DistillError("GGUF export of a qwen2 student with use_sliding_window=true is not supported (llama.cpp's qwen2 has no sliding window)")


def _add_gemma3_hparams(writer, config, head_dim: int) -> None:
    """Gemma 3 text: what llama.cpp's gemma3 graph reads, and a refusal where it would compute otherwise."""
    if getattr(config, "attn_logit_softcapping", None):
        raise DistillError("GGUF export: this gemma3 student uses attention logit soft-capping, which llama.cpp's gemma3 does not")
    scalar = getattr(config, "query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B only).
        raise DistillError(f"GGUF export: gemma3 query_pre_attn_scalar {scalar} differs from head_dim {head_dim}; llama.cpp would scale attention differently")
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    full = _rope(config, "full_attention")
    writer.add_rope_freq_base(float(full["rope_theta"]))
    _add_rope_scaling(writer, full, "gemma3")
    layer_types = list(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if window and any(t == "sliding_attention" for t in layer_types):
        writer.add_sliding_window(int(window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        local = _rope(config, "sliding_attention")
        if "rope_local_base_freq" in config.to_dict():
            local = {"rope_theta": config.rope_local_base_freq, "rope_type": "default"}
        if local["rope_type"] != "default":
            raise DistillError("GGUF export: gemma3 RoPE scaling on sliding-window layers is not supported by llama.cpp")
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


# ------------------------------------------------------------------------------------ tokenizer

def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, read from its structure."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in _SPLIT_NAMES:
            return _SPLIT_NAMES[pattern]
    raise DistillError(f"GGUF export: the tokenizer's pre-tokenizer ({'+'.join(map(str, kinds)) or 'none'}) has no llama.cpp "
                       "equivalent we know (gpt-2, smollm, qwen2, llama-bpe)")


def _is_byte_fallback_bpe(tj: dict) -> bool:
    """A SentencePiece-style BPE (Gemma, Llama 2): '▁' for spaces, <0xNN> byte tokens, byte fallback."""
    model = tj.get("model") or {}
    decoder = json.dumps(tj.get("decoder") or {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "ByteFallback" in decoder


def _add_space_prefix(tj: dict) -> bool:
    """Whether the tokenizer puts '▁' before the text (Llama 2's Metaspace / Prepend) -- Gemma does not."""
    blob = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    return '"Prepend"' in blob or ('"Metaspace"' in blob and '"never"' not in blob and '"add_prefix_space": false' not in blob)


def _token_table(tokenizer, n_vocab: int, normal_type, score=lambda i, tok: 0.0):
    """(tokens, scores, types) for ids 0..n_vocab-1: added tokens CONTROL (special) or USER_DEFINED,
    ids the tokenizer lacks UNUSED `[PADn]` rows, the rest typed by `normal_type(id, token)`."""
    import gguf

    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise DistillError(f"GGUF export: the tokenizer has {len(vocab)} tokens but the model only {n_vocab} embeddings")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]"), scores.append(-1000.0), types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content), scores.append(0.0)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i]), scores.append(score(i, by_id[i])), types.append(normal_type(i, by_id[i]))
    return tokens, scores, types


def _add_tokenizer(writer, tokenizer, n_vocab: int, scratch: Path) -> dict:
    """Vocabulary, merges or scores, special ids, BOS/EOS flags and chat template; returns a short summary.

    Byte-level BPE becomes llama.cpp's `gpt2` vocabulary (tokens + merges + a named pre-tokenizer).
    A byte-fallback BPE in SentencePiece style becomes its `llama` (SentencePiece) vocabulary: tokens,
    BYTE-typed <0xNN> tokens, and scores = -(rank of the merge that makes the token), so that llama.cpp's
    highest-score-first merging replays the BPE merge order.
    """
    import re

    import gguf

    tokenizer.save_pretrained(str(scratch))
    tj_path = scratch / "tokenizer.json"
    if not tj_path.is_file():
        raise DistillError("GGUF export needs a fast tokenizer (tokenizer.json); this student's tokenizer has none")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    decoder = (tj.get("decoder") or {}).get("type")
    if _is_byte_fallback_bpe(tj):
        rank: dict[str, int] = {}
        for m, pair in enumerate(model.get("merges") or []):
            a, b = pair if isinstance(pair, list) else pair.split(" ", 1)
            rank.setdefault(a + b, m)
        byte = re.compile(r"<0x[0-9A-Fa-f]{2}>")

        def kind(i, tok):
            return gguf.TokenType.BYTE if byte.fullmatch(tok) else gguf.TokenType.NORMAL

        tokens, scores, types = _token_table(tokenizer, n_vocab, kind, lambda i, tok: -float(rank[tok]) if tok in rank else 0.0)
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN  # as SentencePiece marks it, even when "added"
        tok_model, pre, space_prefix = "llama", "default", _add_space_prefix(tj)
        writer.add_tokenizer_model(tok_model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(space_prefix)
        special = gguf.SpecialVocab(scratch, load_merges=False, n_vocab=n_vocab)
    elif model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        pre = _pre_tokenizer_name(tj)
        tokens, _, types = _token_table(tokenizer, n_vocab, lambda i, tok: gguf.TokenType.NORMAL)
        tok_model = "gpt2"
        writer.add_tokenizer_model(tok_model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(scratch, load_merges=True, n_vocab=n_vocab)
        if not special.merges:
            raise DistillError("GGUF export: the tokenizer has no BPE merges; llama.cpp cannot tokenize without them")
    else:
        raise DistillError(f"GGUF export supports byte-level BPE (GPT-2 style) and byte-fallback BPE (SentencePiece style) "
                           f"tokenizers; this one is {model.get('type')} with a {decoder} decoder")
    # Whether encoding adds BOS/EOS, read from what the tokenizer does rather than from flags.
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
    for name in ("bos", "eos", "pad", "unk"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            special.special_token_ids[name] = int(tid)
    special.add_to_gguf(writer, quiet=True)
    return {"tokenizer": tok_model, "pre": pre, "tokens": n_vocab, "merges": len(special.merges),
            "chat_template": special.chat_template is not None}


# -------------------------------------------------------------------------------------- tensors

def _permute_rope_rows(w, n_head: int):
    """HF rotate-half row order -> llama.cpp's interleaved pairs (convert_hf_to_gguf's `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _is_tied(model) -> bool:
    """True when the output head is the embedding matrix (then llama.cpp gets no `output.weight`)."""
    import torch

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight.data_ptr() == inp.weight.data_ptr():
        return True
    return bool(getattr(model.config, "tie_word_embeddings", False)) and torch.equal(out.weight, inp.weight)


def _tensors(model, arch: str):
    """(gguf name, float32 numpy array) for every tensor of the GGUF, in the model's order."""
    import gguf
    import numpy as np
    import torch

    config = model.config
    n_layers = int(config.num_hidden_layers)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, n_layers)
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    tied = _is_tied(model)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise DistillError(f"GGUF export: no llama.cpp tensor for {hf_name!r} of this {arch} model")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute_rope_rows(data, n_head)
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute_rope_rows(data, n_kv)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            data = data + 1.0
        yield name, np.ascontiguousarray(data)
    if arch == "llama":
        rope = _rope(config)
        if rope["rope_type"] == "llama3":
            yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(rope, _head_dim(config))


def _tensor_qtype(name: str, data, gguf_type: str, tied: bool):
    import gguf

    if data.ndim <= 1 or name == "rope_freqs.weight":
        return gguf.GGMLQuantizationType.F32
    qtype = _qtype(gguf_type)
    if gguf_type in ("q4_0", "q4_1") and (name == "output.weight" or (tied and name == "token_embd.weight")):
        qtype = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    return qtype


# ---------------------------------------------------------------------------------------- write

def write_gguf(model, tokenizer, out: str | Path, gguf_type: str = "q8_0", *, name: str | None = None,
               description: str | None = None) -> dict:
    """Write `model` (a plain, unquantized transformers causal LM) and its tokenizer as one GGUF file.

    The file is written under a temporary name next to `out` and renamed at the end. Returns a
    summary: architecture, type, size, tensor type counts and the tokenizer summary.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise DistillError(f"--gguf-type {gguf_type!r} is unknown; use one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    arch = gguf_architecture(model.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    counts: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.MODEL)
        if name:
            writer.add_name(name)
        if description:
            writer.add_description(description)
        _add_hparams(writer, model.config, arch, gguf_type)
        with tempfile.TemporaryDirectory(prefix=".gguf-tok-", dir=out.parent) as scratch:
            tok_summary = _add_tokenizer(writer, tokenizer, int(model.config.vocab_size), Path(scratch))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tied = _is_tied(model)
        for tname, data in _tensors(model, arch):
            qtype = _tensor_qtype(tname, data, gguf_type, tied)
            packed = gguf.quants.quantize(data, qtype)
            writer.add_tensor(tname, packed, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"architecture": arch, "gguf_type": gguf_type, "file": str(out), "bytes": out.stat().st_size,
            "tensor_types": counts, "tied_embeddings": tied, **tok_summary}


def agreement(ref_logprobs, other_logprobs) -> dict:
    """How closely `other` next-token log-probs ([T, V]) follow `ref`: the figures the export is judged by.

    kl_mean / kl_max: KL(ref || other) per position, in nats; top1: share of positions with the same
    argmax; max_abs_logprob: largest |difference| over the reference's top-10 tokens (the ones that
    matter for sampling; far-tail log-probs of a quantized model differ more and matter less).
    """
    import torch

    ref, other = ref_logprobs.float().reshape(-1, ref_logprobs.shape[-1]), other_logprobs.float().reshape(-1, other_logprobs.shape[-1])
    kl = (ref.exp() * (ref - other)).sum(-1).clamp_min(0.0)
    top = ref.topk(min(10, ref.shape[-1]), dim=-1).indices
    diff = (ref.gather(-1, top) - other.gather(-1, top)).abs()
    return {"positions": int(ref.shape[0]), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((ref.argmax(-1) == other.argmax(-1)).float().mean()), "max_abs_logprob": float(diff.max())}
