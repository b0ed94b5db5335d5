"""Agreement of a model with the teacher on a held-out cache: KL, top-1 agreement, calibration (ECE).

One pass over the cache. KL and top-1 agreement use `students.evaluate.topk_tail_kl_and_agreement`,
so they are the very numbers `evaluate_on_cache` (and the trainer's eval) reports: forward KL over the
cached top-k plus a tail bucket against the stored log-probs, student at T=1. The same logits give the
expected calibration error:

    confidence = the model's top-1 probability (temperature 1, as deployed)
    hit        = the model's argmax equals the TEACHER's top-1 token (topk_ids[..., 0])

i.e. "when the student is 80% sure, does it agree with the teacher 80% of the time". The teacher's
top-1 is used rather than the cached trace's actual next token because the teacher's distribution is
the target the student was distilled towards (for greedy-generated traces the two coincide).

Logits are never built for the whole [B, T, V] batch: only the trained positions' final hidden
states go through the head, a chunk of rows at a time. Columns past the tokenizer length (padded
embeddings) get -inf before any softmax.
"""

from __future__ import annotations

from functools import partial

from distill.bench.stats import CalibrationBins
from distill.errors import DistillError

ROW_CHUNK = 512


def _hidden_and_head(model, batch):
    try:
        from students.head import model_hidden_and_head
    except ImportError:  # pragma: no cover - the students package ships it
        model_hidden_and_head = None
    if model_hidden_and_head is not None:
        return model_hidden_and_head(model, batch)
    # Minimal fallback for plain HF causal LMs (no soft-capping models).
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state, model.get_output_embeddings()


def open_cache(path: str, tokenizer):
    """A CacheReader over `path` that refuses a cache made with another tokenizer."""
    from distill.cache.format import tokenizer_fingerprint
    from distill.cache.reader import CacheReader

    return CacheReader(path, expect_fingerprint=tokenizer_fingerprint(tokenizer))


def calibration_pass(model, reader, *, vocab_size: int, batch_size: int = 4, num_bins: int = 10, pad_id: int = 0,
                     max_samples: int | None = None) -> dict:
    """One pass over the cache: ECE (see module docstring), top-1 agreement and forward KL."""
    import torch

    from distill.cache.reader import CacheDataset, collate

    from students.evaluate import topk_tail_kl_and_agreement

    indices = list(range(len(reader)))[: max_samples or None]
    loader = torch.utils.data.DataLoader(CacheDataset(reader, indices), batch_size=batch_size,
                                         collate_fn=partial(collate, pad_id=pad_id))
    device = next(model.parameters()).device
    bins = CalibrationBins(num_bins)
    agree = 0.0
    tokens = 0
    kl_sum = 0.0
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden, head = _hidden_and_head(model, batch)
            valid = batch["targets"] != -100
            if not bool(valid.any()):
                continue
            h = hidden[valid]
            tids = batch["topk_ids"][valid]
            tlp = batch["topk_logprobs"][valid].float()
            for s in range(0, h.shape[0], ROW_CHUNK):
                logits = head(h[s : s + ROW_CHUNK]).float()
                if logits.shape[-1] > vocab_size:
                    logits[:, vocab_size:] = float("-inf")
                ids = tids[s : s + ROW_CHUNK]
                kl, hit = topk_tail_kl_and_agreement(logits, ids, tlp[s : s + ROW_CHUNK], vocab_size)
                conf = torch.softmax(logits, dim=-1).max(dim=-1).values
                bins.update(conf, hit)
                agree += float(hit.sum())
                kl_sum += float(kl.double().sum())
                tokens += int(hit.numel())
    if tokens == 0:
        raise DistillError(f"held-out cache {reader.path} has no trained positions to evaluate")
    return {
        "ece": bins.ece(),
        "ece_target": "teacher_top1",
        "mean_confidence": bins.mean_confidence(),
        "top1_agreement": agree / tokens,
        "kl": kl_sum / tokens,
        "tokens": tokens,
    }


def agreement_with_teacher(model, tokenizer, cache_dir: str, *, batch_size: int = 4, max_samples: int | None = None) -> dict:
    """KL, top-1 agreement and ECE of `model` against the cached teacher; raises DistillError when
    the cache cannot be used with this model (other tokenizer, incomplete, missing)."""
    reader = open_cache(cache_dir, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = calibration_pass(model, reader, vocab_size=len(tokenizer), batch_size=batch_size, pad_id=pad_id,
                              max_samples=max_samples)
    result["samples"] = min(len(reader), max_samples or len(reader))
    return result
