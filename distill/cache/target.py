"""The decoded sparse target: what every cache codec decodes to and what the KD loss consumes.

A codec (distill/cache/codecs) decides how the teacher's next-token distribution of a trained position
is stored. Whatever the storage, a decoded row is m slots, each a token id with the teacher's log-prob,
and optionally a weight and a validity flag:

    ids       [..., m] int64  token ids; 0 in padded slots
    logprobs  [..., m] fp32   teacher log p_j, normalised over the FULL vocabulary at the cache
                              temperature T_store; 0.0 in padded slots
    weights   [..., m] fp32 or None
              None: the m ids are the EXACT top-m of the teacher (sorted, descending), and the rest of
                    the vocabulary is one tail bucket of mass 1 - sum exp(logprobs) (codec "topk").
              a tensor: an estimator. The KD term of a row is sum_j weights_j * (logprobs_j - log q_j),
                    whose expectation over the codec's sampling is KL(p || q) and whose gradient is the
                    forward-KL gradient (sampled codecs: count/n or importance weights; exact top-k head
                    slots of a mixed codec: p_j). Padded slots carry weight 0.
    valid     [..., m] bool or None: False marks padded slots (a row with fewer distinct ids than m).
              None: every slot is real.

Batches keep these as `target_ids`, `target_logprobs` and, when a codec produces them,
`target_weights` and `target_valid` (`BATCH_KEYS`). The ids and log-probs of exact codecs and of
estimators are the same numbers (teacher log-probs at T_store); only the weights say how a row is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

K_IDS, K_LOGPROBS, K_WEIGHTS, K_VALID = "target_ids", "target_logprobs", "target_weights", "target_valid"
BATCH_KEYS = (K_IDS, K_LOGPROBS, K_WEIGHTS, K_VALID)


@dataclass
class SparseTarget:
    """One decoded sparse target (rows of one sample, or a collated [B, T, m] batch); see module doc."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    weights: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return int(self.ids.shape[-1]) if self.ids.dim() else 0

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The sample/batch keys (`target_*`); absent optional parts are left out."""
        out = {K_IDS: self.ids, K_LOGPROBS: self.logprobs}
        if self.weights is not None:
            out[K_WEIGHTS] = self.weights
        if self.valid is not None:
            out[K_VALID] = self.valid
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SparseTarget":
        """The target held by a sample or a collated batch (keys `target_*`)."""
        return cls(d[K_IDS], d[K_LOGPROBS], d.get(K_WEIGHTS), d.get(K_VALID))

    def slice_rows(self, n: int) -> "SparseTarget":
        """The first n rows (a cut sample keeps a prefix of its rows)."""
        cut = (lambda t: None if t is None else t[:n])
        return SparseTarget(self.ids[:n], self.logprobs[:n], cut(self.weights), cut(self.valid))


def teacher_top1(ids: torch.Tensor, logprobs: torch.Tensor, valid: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's most likely id among the slots of each row: the slot with the largest log-prob.

    For the exact top-k codec that is slot 0 (rows are sorted, argmax returns the first maximum); for a
    sampled codec it is the most probable id that was drawn.
    """
    if valid is None and weights is None:
        return ids[..., 0]
    lp = logprobs.float() if valid is None else torch.where(valid, logprobs.float(), float("-inf"))
    return ids.gather(-1, lp.argmax(dim=-1, keepdim=True)).squeeze(-1)
