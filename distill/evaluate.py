"""Held-out quality of a student against the cached teacher: KL(teacher || student) and top-1 agreement.

Both are computed on trained positions only, chunk by chunk over rows of final hidden states (the
[B,T,V] logits are never built), with the student's logits columns past the tokenizer length at -inf.

KL is the forward KL over the teacher's cached top-k plus one tail bucket, at the cache temperature
T_store: the stored log-probs as they are against the student's logits divided by T_store. It is zero
exactly when the student matches the teacher on the cached support and the tail mass, whatever T_store
(comparing the student at T=1 with a teacher stored at T_store != 1 would report a positive KL for a
student identical to the teacher). It is the training statistic `kl` of the loss module too.
For a sampled cache (an estimator target, distill/cache/target.py) the KL is the codec's unbiased
estimate sum_j w_j (log p_j - log q_j): right on average, noisy per position.
Top-1 agreement: the student's argmax equals the teacher's most likely token among the stored slots
(the top-k's first id; for a sampled cache, the most probable id drawn).
"""

from __future__ import annotations

import math
from typing import Any

import torch


@torch.no_grad()
def evaluate_on_cache(model, tokenizer=None, dataset=None, *, batch_size: int = 8, pad_id: int | None = None,
                      chunk_size: int | None = None, vocab_size: int | None = None, max_samples: int | None = None,
                      progress: bool = False, device=None, cache_temperature: float | None = None,
                      full_logits: bool | None = None) -> dict[str, Any]:
    """Mean held-out KL and top-1 agreement over the trained positions of `dataset` (CacheDataset-like).

    `vocab_size` defaults to `len(tokenizer)`; `pad_id` to the tokenizer's pad id; `chunk_size` (rows
    of logits per chunk) to the loss module's automatic size; `cache_temperature` to the temperature
    in the manifest of the cache behind `dataset` (1.0 for samples that come with no manifest).
    `full_logits`: the logits path (`distill.models.head.check_head`); None checks the head on the first
    sample here, so a model whose forward the chunked head does not reproduce is scored on its own
    logits. Returns {"kl", "top1_agreement", "tokens", "samples", "head_path"}.
    """
    from tqdm.auto import tqdm

    from distill.cache.reader import collate
    from distill.cache.target import SparseTarget
    from distill.losses import KDLossConfig, target_loss_sums
    from distill.models.head import CHUNKED_HEAD, FULL_LOGITS, HEAD_CHECK_TOKENS, check_head, rows_and_head

    if dataset is None:
        raise ValueError("evaluate_on_cache needs a dataset")
    if vocab_size is None and tokenizer is not None:
        vocab_size = len(tokenizer)
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad_id = 0 if pad_id is None else int(pad_id)
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    if device is None:
        device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    if full_logits is None and n > 0:
        full_logits = check_head(model, dataset[0]["input_ids"][:HEAD_CHECK_TOKENS].to(device)).full_logits
    head_path = FULL_LOGITS if full_logits else CHUNKED_HEAD
    if cache_temperature is None:
        cache_temperature = dataset_cache_temperature(dataset)
    T = float(cache_temperature)
    # forward-kl at T_store against the teacher as stored: the loss module's kl_sum / top1_agree stats.
    cfg = KDLossConfig(kind="forward-kl", temperature=T, cache_temperature=T, vocab_size=vocab_size, chunk_size=chunk_size)
    kl_sum = torch.zeros((), dtype=torch.float64)
    agree_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    try:
        for start in tqdm(range(0, n, batch_size), desc="eval", disable=not progress):
            batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            rows, head = rows_and_head(model, batch, full_logits=bool(full_logits))
            sums = target_loss_sums(rows, head, batch["targets"], SparseTarget.from_dict(batch), cfg)
            kl_sum += sums.kl_sum.double().cpu()
            agree_sum += sums.top1_agree.double().cpu()
            tokens += sums.n_tokens
    finally:
        if was_training:
            model.train()
    if tokens == 0:
        return {"kl": math.nan, "top1_agreement": math.nan, "tokens": 0, "samples": n, "head_path": head_path}
    return {"kl": float(kl_sum / tokens), "top1_agreement": float(agree_sum / tokens), "tokens": tokens, "samples": n,
            "head_path": head_path}


def dataset_cache_temperature(dataset, default: float = 1.0) -> float:
    """The manifest temperature of the cache behind `dataset`, looking through wrappers that hold the
    wrapped data set as `.dataset` (subsets, truncation) down to a `CacheDataset`'s reader."""
    seen = 0
    while dataset is not None and seen < 16:
        reader = getattr(dataset, "reader", None)
        manifest = getattr(reader, "manifest", None) or getattr(dataset, "manifest", None)
        if manifest is not None:
            return float(manifest.temperature)
        dataset, seen = getattr(dataset, "dataset", None), seen + 1
    return float(default)
