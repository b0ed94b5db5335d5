"""Agreement of a model with the teacher on a held-out cache: KL, top-1 agreement, calibration (ECE).

KL and top-1 agreement come from `distill.evaluate.evaluate_on_cache`, so they are the very numbers
the trainer's held-out evaluation reports (forward KL over the cached top-k plus a tail bucket, against
the stored log-probs, the model's logits divided by the cache temperature). This module adds the
expected calibration error in its own pass:

    confidence = the model's top-1 probability (temperature 1, as deployed)
    hit        = the model's argmax equals the TEACHER's top-1 token (the cache's most probable stored id)

i.e. "when the student is 80% sure, does it agree with the teacher 80% of the time". The teacher's
top-1 is used rather than the cached trace's actual next token because the teacher's distribution is
the target the student was distilled towards (for greedy-generated traces the two coincide). The
pass also counts top-1 agreement itself, which tests compare with `evaluate_on_cache`.

Logits are never built for the whole [B, T, V] batch: only the trained positions' final hidden
states go through the head (`distill.models.head.rows_and_head`), a chunk of rows at a time, unless the
head check (`distill.models.head.check_head`) finds that the chunked head does not reproduce the model's
logits: then the model's own logits are used, as in `evaluate_on_cache`.
Columns past the tokenizer length (padded embeddings) get -inf before any softmax.
"""

from __future__ import annotations

from functools import partial

from distill.bench.stats import CalibrationBins
from distill.errors import DistillError

ROW_CHUNK = 512


def open_cache(path: str, tokenizer):
    """A CacheReader over `path` that refuses a cache made with another tokenizer."""
    from distill.cache.format import tokenizer_fingerprint
    from distill.cache.reader import CacheReader

    return CacheReader(path, expect_fingerprint=tokenizer_fingerprint(tokenizer))


def calibration_pass(model, reader, *, vocab_size: int, batch_size: int = 4, num_bins: int = 10, pad_id: int = 0,
                     max_samples: int | None = None) -> dict:
    """One pass over the cache: ECE and top-1 agreement (see module docstring)."""
    import torch

    from distill.cache.reader import CacheDataset, collate
    from distill.cache.target import SparseTarget, teacher_top1
    from distill.models.head import HEAD_CHECK_TOKENS, check_head, rows_and_head

    indices = list(range(len(reader)))[: max_samples or None]
    loader = torch.utils.data.DataLoader(CacheDataset(reader, indices), batch_size=batch_size,
                                         collate_fn=partial(collate, pad_id=pad_id))
    device = next(model.parameters()).device
    bins = CalibrationBins(num_bins)
    agree = 0.0
    tokens = 0
    model.eval()
    full_logits = bool(indices) and check_head(model, reader[indices[0]]["input_ids"][:HEAD_CHECK_TOKENS].to(device)).full_logits
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden, head = rows_and_head(model, batch, full_logits=full_logits)
            valid = batch["targets"] != -100
            if not bool(valid.any()):
                continue
            h = hidden[valid]
            tgt = SparseTarget.from_dict(batch)
            top1 = teacher_top1(tgt.ids, tgt.logprobs, tgt.valid, tgt.weights)[valid]
            for s in range(0, h.shape[0], ROW_CHUNK):
                logits = head(h[s : s + ROW_CHUNK]).float()
                if logits.shape[-1] > vocab_size:
                    logits[:, vocab_size:] = float("-inf")
                conf, pred = torch.softmax(logits, dim=-1).max(dim=-1)
                hit = pred == top1[s : s + ROW_CHUNK]
                bins.update(conf, hit)
                agree += float(hit.sum())
                tokens += int(hit.numel())
    if tokens == 0:
        raise DistillError(f"held-out cache {reader.path} has no trained positions to evaluate")
    return {
        "ece": bins.ece(),
        "ece_target": "teacher_top1",
        "mean_confidence": bins.mean_confidence(),
        "top1_agreement": agree / tokens,
        "tokens": tokens,
    }


def agreement_with_teacher(model, tokenizer, cache_dir: str, *, batch_size: int = 4, max_samples: int | None = None) -> dict:
    """KL, top-1 agreement and ECE of `model` against the cached teacher; raises DistillError when
    the cache cannot be used with this model (other tokenizer, incomplete, missing)."""
    reader = open_cache(cache_dir, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cal = calibration_pass(model, reader, vocab_size=len(tokenizer), batch_size=batch_size, pad_id=pad_id,
                           max_samples=max_samples)
    from distill.cache.reader import CacheDataset
    from distill.evaluate import evaluate_on_cache

    ev = evaluate_on_cache(model, tokenizer, CacheDataset(reader), batch_size=batch_size, pad_id=pad_id,
                           max_samples=max_samples, cache_temperature=float(reader.manifest.temperature))
    return {
        "kl": ev["kl"],
        "top1_agreement": ev["top1_agreement"],
        "ece": cal["ece"],
        "ece_target": cal["ece_target"],
        "mean_confidence": cal["mean_confidence"],
        "tokens": ev["tokens"],
        "samples": ev.get("samples"),
        "cache_temperature": float(reader.manifest.temperature),
    }
