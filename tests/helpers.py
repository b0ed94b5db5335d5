"""Tiny real models and tokenizers for the tests (imported as `helpers`: tests/ is on the path via conftest).

They are real `transformers` objects (a byte-level BPE tokenizer trained on the fly, a randomly
initialised Llama), small enough that a test builds, saves and runs one in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

_CORPUS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have? 3 + 4 = 7. The answer is 7.",
    "A baker makes 12 loaves a day for 5 days, so 12 * 5 = 60 loaves. #### 60",
    "Sara reads 20 pages each night. After 6 nights she has read 120 pages.",
    "The store sells pens for $2 each. Ten pens cost $20. What is the total?",
    "Question: what is 15 minus 8? Let me think step by step. 15 - 8 = 7.",
    "system user assistant You are a helpful assistant that reasons before answering.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 40 50 60 70 80 90 100",
]


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def tiny_tokenizer(vocab_size: int = 320, *, pre: str = "gpt-2"):
    """A byte-level BPE `PreTrainedTokenizerFast` with chat template and reasoning tags.

    `pre` picks the pre-tokenizer of a real family, so that exports can be checked per family:
    "gpt-2" (plain byte-level regex), "smollm" (digits split one by one, then byte-level) or
    "qwen2" (Qwen2's split regex + NFC normalizer).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ValueError(f"unknown pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(
    tokenizer,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    pad_vocab_to: int | None = None,
    tie_word_embeddings: bool = False,
):
    """A random Llama for `tokenizer`; `pad_vocab_to` makes the logits wider than the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = max(len(tokenizer), pad_vocab_to or 0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def save_tiny_model(directory: str | Path, *, seed: int = 0, **kwargs) -> Path:
    """Build a tiny tokenizer + Llama and save both to `directory` (a plain HF model directory)."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=seed, **kwargs)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_gemma4_multimodal(vocab_size: int, *, softcap: float = 2.0, seed: int = 0, head_scale: float = 200.0,
                           pad_token_id: int | None = None, eos_token_id: int | None = None):
    """A random Gemma-4 `ForConditionalGeneration` (no vision or audio tower) whose final-logit
    soft-cap lives only in its TEXT config, as in Gemma-3n / Gemma-4 checkpoints.

    Gemma-3n itself cannot be built tiny without `timm` (its vision tower); Gemma-4 keeps the cap in
    the same place and applies it the same way (`config.get_text_config().final_logit_softcapping`).
    The head is scaled up so that raw logits exceed the cap by far and capping changes them.
    """
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig

    text = Gemma4TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, final_logit_softcapping=softcap,
        layer_types=["sliding_attention", "full_attention"], eos_token_id=eos_token_id,
        pad_token_id=0 if pad_token_id is None else pad_token_id,  # its forward masks media tokens with it
    )
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    model.eval()
    return model


def tiny_qwen2(tokenizer, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, pad_vocab_to: int | None = None,
               tie_word_embeddings: bool = True):
    """A random Qwen2 (q/k/v biases, tied embeddings like the small Qwen2.5) for `tokenizer`.

    The biases are drawn at a visible scale (the default init is zero), so that an export that
    dropped or misplaced them would show in the logits.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=max(len(tokenizer), pad_vocab_to or 0), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    model.eval()
    return model


def tiny_gemma3(tokenizer, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """A random Gemma 3 text model (Gemma3ForCausalLM) for `tokenizer`.

    head_dim 256 = query_pre_attn_scalar, as in every released Gemma 3 but the 27B: llama.cpp scales
    attention by 1/sqrt(head_dim), and transformers' GGUF loader assumes 256. The RMSNorm weights are
    drawn away from zero (their init), so that the (1 + w) convention is exercised.
    """
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
        query_pre_attn_scalar=256, max_position_embeddings=512, sliding_window=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    model.eval()
    return model


def tiny_spm_tokenizer(vocab_size: int = 400):
    """A SentencePiece-style tokenizer as Gemma ships it (transformers' GemmaTokenizer): BPE with byte
    fallback over '▁'-for-space text, <0x00>..<0xFF> byte tokens, no prefix space, BOS added; plus the
    chat tags of `tiny_tokenizer`. Trained on the fly like it."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + bytes_, show_progress=False)
    trainer_tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    tok = GemmaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:3]})
    tok.add_tokens(SPECIAL_TOKENS[3:])
    tok.chat_template = CHAT_TEMPLATE
    return tok
