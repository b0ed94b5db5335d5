"""Held-out quality of a student against the cached teacher: KL(teacher || student) and top-1 agreement.

Both are computed on trained positions only, chunk by chunk over rows of final hidden states (the
[B,T,V] logits are never built), with the student's logits columns past the tokenizer length at -inf.

KL is the forward KL over the teacher's cached top-k plus one tail bucket, at the cache temperature
(the stored log-probs as they are, student at T=1): the same quantity as the default training loss
at T=1 and zero exactly when the student matches the teacher on the cached support and the tail mass.
Top-1 agreement: the student's argmax equals the teacher's most likely token (`topk_ids[..., 0]`).
"""

from __future__ import annotations

import math
from typing import Any

import torch


@torch.no_grad()
def evaluate_on_cache(model, tokenizer=None, dataset=None, *, batch_size: int = 8, pad_id: int | None = None,
                      chunk_size: int = 512, vocab_size: int | None = None, max_samples: int | None = None,
                      progress: bool = False, device=None) -> dict[str, Any]:
    """Mean held-out KL and top-1 agreement over the trained positions of `dataset` (CacheDataset-like).

    `vocab_size` defaults to `len(tokenizer)`; `pad_id` to the tokenizer's pad id. Returns
    {"kl", "top1_agreement", "tokens", "samples"}.
    """
    from tqdm.auto import tqdm

    from distill.cache.reader import collate
    from distill.losses import KDLossConfig, distillation_loss_sums
    from distill.models.head import model_hidden_and_head

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
    # forward-kl at T=1 against the teacher as stored: the loss module's kl_sum / top1_agree stats.
    cfg = KDLossConfig(kind="forward-kl", temperature=1.0, cache_temperature=1.0, vocab_size=vocab_size, chunk_size=chunk_size)
    kl_sum = torch.zeros((), dtype=torch.float64)
    agree_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    try:
        for start in tqdm(range(0, n, batch_size), desc="eval", disable=not progress):
            batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden, head = model_hidden_and_head(model, batch)
            sums = distillation_loss_sums(hidden, head, batch["targets"], batch["topk_ids"], batch["topk_logprobs"], cfg)
            kl_sum += sums.kl_sum.double().cpu()
            agree_sum += sums.top1_agree.double().cpu()
            tokens += sums.n_tokens
    finally:
        if was_training:
            model.train()
    if tokens == 0:
        return {"kl": math.nan, "top1_agreement": math.nan, "tokens": 0, "samples": n}
    return {"kl": float(kl_sum / tokens), "top1_agreement": float(agree_sum / tokens), "tokens": tokens, "samples": n}
