"""Run an exported GGUF in the real llama.cpp runtime (llama-cpp-python) and in transformers, side by side.

llama-cpp-python is an optional extra (`pip install -e .[gguf-check]`, built from source: see
scripts/check_llamacpp.sh); nothing else in the project imports this module. The comparisons are
the ones the export is judged by: the same token ids from both tokenizers, the same greedy
continuation, and next-token log-probs within the GGUF type's rounding (students.export_gguf.agreement).
"""

from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError


def open_llama(path: str | Path, *, n_ctx: int = 512, threads: int = 1):
    """A llama.cpp model over `path` that keeps the logits of every evaluated position."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise DistillError("llama-cpp-python is not installed; run scripts/check_llamacpp.sh "
                           "(or pip install -e '.[gguf-check]')") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=threads,
                 n_threads_batch=threads, seed=0)


def llama_tokenize(llm, text: str) -> list[int]:
    """llama.cpp's tokens for `text`, special tokens parsed, no BOS added (the chat template writes its own)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def llama_logprobs(llm, ids: list[int]):
    """[len(ids), V] next-token log-probs that llama.cpp computes over `ids` (torch tensor, fp32)."""
    import numpy as np
    import torch

    llm.reset()
    llm.eval(list(ids))
    scores = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    return torch.log_softmax(torch.from_numpy(scores), -1)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids`, as llama.cpp picks them (argmax of its logits)."""
    import numpy as np

    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def hf_logprobs(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.float()[0], -1)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` from a transformers model (argmax each step, never stopping at EOS,
    as `llama_greedy` does)."""
    import torch

    out = []
    with torch.no_grad():
        res = model(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            # transformers >= 5.24 names the cache `cache` (older: `past_key_values`)
            past = res.get("cache", None) if hasattr(res, "get") else None
            kwargs = {"cache": past} if past is not None else {"past_key_values": res.past_key_values}
            res = model(input_ids=torch.tensor([[nxt]]), use_cache=True, **kwargs)
    return out


def reference(model, tokenizer, prompts: list[str], new_tokens: int) -> list[tuple[list[int], list[int], object]]:
    """Per prompt: (prompt ids, the model's greedy continuation, log-probs over both) -- computed once,
    compared with several files."""
    refs = []
    for text in prompts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        cont = hf_greedy(model, ids, new_tokens)
        refs.append((ids, cont, hf_logprobs(model, ids + cont)))
    return refs


def compare(model, tokenizer, gguf_path: str | Path, prompts: list[str], *, new_tokens: int = 16, refs=None) -> dict:
    """llama.cpp on `gguf_path` vs the transformers `model` on each prompt: tokens, greedy, log-probs.
    `refs` (from `reference`) saves recomputing the model's side when several files are compared."""
    from students.export_gguf import agreement

    refs = refs or reference(model, tokenizer, prompts, new_tokens)
    llm = open_llama(gguf_path, n_ctx=max(256, 4 * new_tokens + 256))
    rows = []
    for text, (ids, hf_out, ref_lp) in zip(prompts, refs):
        same_tokens = llama_tokenize(llm, text) == ids
        cpp_out = llama_greedy(llm, ids, new_tokens)
        # Log-probs over the prompt AND the continuation (teacher-forced on the transformers one).
        res = agreement(ref_lp, llama_logprobs(llm, ids + hf_out))
        first_diff = next((i for i, (a, b) in enumerate(zip(hf_out, cpp_out)) if a != b), None)
        rows.append({"prompt": text[:60], "tokens_equal": same_tokens, "greedy_equal": hf_out == cpp_out,
                     "greedy_first_difference": first_diff, **res})
    return {"file": str(gguf_path), "prompts": rows,
            "all_tokens_equal": all(r["tokens_equal"] for r in rows),
            "all_greedy_equal": all(r["greedy_equal"] for r in rows),
            "greedy_token_agreement": sum((r["greedy_first_difference"] if r["greedy_first_difference"] is not None else new_tokens)
                                          for r in rows) / (new_tokens * len(rows)),
            "max_abs_logprob": max(r["max_abs_logprob"] for r in rows),
            "kl_mean": sum(r["kl_mean"] for r in rows) / len(rows),
            "top1": sum(r["top1"] * r["positions"] for r in rows) / sum(r["positions"] for r in rows)}
