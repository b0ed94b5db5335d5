"""Chunked sparse knowledge-distillation loss against a cached teacher target.

The teacher cache holds, for every trained position, a sparse target decoded by its codec
(distill/cache/target.py): token ids and their log-probabilities normalised over the FULL vocabulary
at the cache temperature `T_store`, either the exact top-k (codec "topk", no weights: the rules below)
or an estimator with weights (sampled codecs: "Estimator targets" at the end). The
student side starts from its final hidden states: they are projected through the model's own head
(lm_head plus the model's logit scaling / soft-capping) a chunk of rows at a time, under activation
checkpointing, so that only one [chunk, V] block of logits is alive at any moment, in the forward
and in the backward pass. The [N, V] logits of a whole batch are never built (at V = 262,144 and
4k tokens they alone would be 4 GiB in fp32).

Every rule below is a bug that shipped in another tool (docs/losses.md lists them):

* The default divergence is forward KL over the k cached tokens PLUS one tail bucket holding the
  rest of the vocabulary. Renormalising over the k tokens ("forward-kl-renorm") is offered by name
  only: at k = 1 it is identically zero, so it teaches nothing about confidence.
* The reported `kl_sum` is a true KL (zero when student and teacher agree), never cross-entropy,
  taken at the cache temperature (student logits / T_store against the teacher as stored), so that a
  student identical to the teacher reports 0 whatever T_store and T_train.
* Teacher log-probs cached at `T_store` are re-tempered to the training temperature `T_train` as
  p^(T_store/T_train), renormalised; the KD term is multiplied by T_train^2 so that its gradient
  scale does not shrink as the temperature grows. The trainer refuses T_train != T_store unless the
  user accepts the tail approximation below by naming a tail rule.
* Returned values are SUMS over valid tokens; the trainer divides by the number of valid tokens in
  the whole optimizer step (all micro-batches) through `combine_loss`, the one place where KD and CE
  are mixed. Both terms stay in the backward pass.
* Masks are applied with `torch.where` before anything is exponentiated or multiplied: -inf * 0 is
  NaN, and a NaN in a discarded branch still poisons the gradient.
* Logit columns at or past the tokenizer length (padded embeddings) are set to -inf before any
  logsumexp, never to zero (zero would leak probability mass to tokens that do not exist).

The tail bucket
---------------
Teacher: only the stored values are known, so p_tail = 1 - sum_i p_i is computed as
-expm1(logsumexp(stored)) (no cancellation error beyond that of the stored values). A tail below
`TAIL_EPS` (1e-6) is rounding noise of the stored values and is treated as exactly zero mass; the
k + 1 outcome teacher distribution is then renormalised, which also absorbs the small excess over 1
that fp16/bf16-stored values can sum to.

Student: the student's full distribution is available, so its tail is computed exactly as
logsumexp over the NON-cached columns minus the full logsumexp (the cached columns are masked to
-inf in a copy of the chunk). The usual form log1p(-exp(logsumexp(log q_i))) must be clamped when the
student puts nearly all its mass on the cached tokens, and the clamp zeroes exactly the gradient that
should move mass back into the tail; the masked logsumexp has no cancellation and no clamp.

Empty student tail: when the k cached ids cover every column the student can put mass on (k at the
vocabulary size; the cache builder refuses it, hand-made caches may not), the teacher's true tail is
exactly 0 and any computed p_tail is rounding of the stored values (~1e-4 in fp16). Such a tail
cannot be matched (forward KL would be infinite), so it is dropped for those rows and the teacher's k
outcomes renormalised.

Temperature and the tail: re-tempering p^a with a = T_store/T_train is exact for the k cached
tokens, but the tail is one number standing for V - k tokens whose individual probabilities are
unknown. Two rules (`KDLossConfig.tail_rule`), both exact when a = 1 (T_train == T_store):

* "uniform" (default): the tail spread evenly over the V - k uncached tokens, re-tempered token by
  token: (V-k) * (p_tail/(V-k))^a = p_tail^a * (V-k)^(1-a).
* "bucket": the tail re-tempered as ONE outcome, p_tail^a.

The true tempered tail sum_j p_j^a lies between them (for a < 1 bucket is the lower bound, uniform the
upper; for a > 1 the other way round), and uniform measures far closer on both Zipf-shaped and real
next-token distributions: KL(true tempered teacher || target) per position, k = 64, V = 49,152,
T_store = 1 (benchmarks/bench_retemper_tail.py):

    distribution            T_train   uniform    bucket
    Zipf s=1.1 (tail 0.44)    0.5      0.0088    2.03
                              2        0.0027    1.83
    Zipf s=1.5 (tail 0.09)    0.5      0.0004    0.046
                              2        0.033     2.04
    Zipf s=2.0 (tail 0.009)   0.5      0.000005  0.0002
                              2        0.21      1.47
    SmolLM2-135M, 251 pos.    0.5      0.0024    0.107
      (mean tail 0.047)       2        0.166     1.40

(SmolLM2: next-token distributions along four short texts; one more position has a stored tail below
TAIL_EPS, which both rules drop.)

The uniform factor (V-k)^(1-a) is large (~500x at V = 262k, a = 0.5), but the tails of real language
models are long and flat enough that it is the better guess. Cache at the temperature you train at
when you can: the trainer refuses another one unless a rule is named (`--retemper-tail`).

Reverse KL and JSD
------------------
Both need the teacher's probability of every token the student puts mass on. Over a sparse cache
they are computed on the coarse-grained k + 1 outcome distributions (cached tokens + tail) and are
APPROXIMATIONS: by the data-processing inequality each is a lower bound of the full-vocabulary
divergence. For reverse KL the teacher's outcomes are floored at TAIL_EPS (a zero-mass teacher tail
would make reverse KL infinite as soon as the student puts any mass outside the cache). The
generalised JSD is JSD_beta(p, q) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p +
(1 - beta) q, with beta strictly in (0, 1) (use forward-kl / reverse-kl for the limits).

Estimator targets
-----------------
A target with weights w (sampled codecs) is read as KD = sum_j w_j (log p_j - log q_j) over its valid
slots. With c_j draws of id j out of n from p, w_j = c_j / n; from a flattened proposal r, w_j =
(p_j / r_j) c_j / n; an exact head stored beside tail draws has w_i = p_i and the tail draws
w_j = p_tail c_j / n. In every case E[sum_j w_j f(j)] = sum_j p_j f(j) for any f, so KD is an unbiased
estimate of KL(p || q) and its gradient, sum_j w_j (q - e_j) / T for the student's logits, is an
unbiased estimate of the dense forward-KL gradient (q - p) / T. The top-k + tail bucket gradient is
not: it pulls the tail tokens in the student's own proportions, not the teacher's. Only forward KL at
T_store is served: re-tempering needs p^a normalised over the whole vocabulary, which draws cannot give
without bias, and reverse KL / JSD need p at every token the student puts mass on. The `kl_sum`
statistic is the same estimate (unbiased, noisy per row, may be negative); top-1 agreement compares
with the most probable id among the slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from distill.errors import DistillError

IGNORE_INDEX = -100
TAIL_EPS = 1e-6
_LOG_TAIL_EPS = math.log(TAIL_EPS)
# Auto chunk size: at most this many fp32 logits per chunk (256 MiB), and at most 1024 rows.
_AUTO_CHUNK_ELEMENTS = 1 << 26
_MAX_AUTO_CHUNK_ROWS = 1024

LOSS_KINDS = ("forward-kl", "forward-kl-renorm", "reverse-kl", "jsd")
# How the teacher's tail bucket is re-tempered when T_train != T_store (see "Temperature and the tail").
TAIL_RULES = ("uniform", "bucket")


@dataclass
class KDLossConfig:
    """How the KD term is computed; `kd_weight`/`ce_weight` are used only by `combine_loss`.

    kind: "forward-kl" (default: top-k + tail bucket), "forward-kl-renorm" (top-k renormalised),
        "reverse-kl" or "jsd" (both approximations over the cached support + tail).
    temperature: training temperature T_train (student logits / T, teacher re-tempered, KD * T^2).
    cache_temperature: T_store, the temperature at which the cache was written (from its manifest).
    tail_rule: how the teacher's tail is re-tempered when T_train != T_store (an approximation either
        way; the module docstring has the measurement): "uniform" spreads p_tail evenly over the V - k
        uncached tokens, (V-k) * (p_tail/(V-k))^a; "bucket" treats it as one token, p_tail^a. Both are
        exact when T_train == T_store. V is `vocab_size` (else the logits width).
    beta: JSD mixing weight, strictly between 0 and 1.
    vocab_size: the real tokenizer length; logit columns >= it are -inf. None: all columns are real.
    chunk_size: rows of logits per chunk; None picks min(1024, 2**26 // V) rows (<= 256 MiB fp32).
    """

    kind: str = "forward-kl"
    temperature: float = 1.0
    cache_temperature: float = 1.0
    beta: float = 0.5
    vocab_size: int | None = None
    chunk_size: int | None = None
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    tail_rule: str = "uniform"

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise DistillError(f"unknown loss kind {self.kind!r}; choose one of {', '.join(LOSS_KINDS)}")
        if self.tail_rule not in TAIL_RULES:
            raise DistillError(f"unknown tail rule {self.tail_rule!r}; choose one of {', '.join(TAIL_RULES)}")
        for name in ("temperature", "cache_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise DistillError(f"{name} must be a positive number, got {value!r}")
        if self.kind == "jsd" and not 0.0 < self.beta < 1.0:
            raise DistillError(
                f"jsd beta must lie strictly between 0 and 1, got {self.beta}; "
                "use --loss forward-kl or reverse-kl for the limits"
            )
        if self.vocab_size is not None and self.vocab_size < 1:
            raise DistillError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise DistillError(f"chunk_size must be at least 1 row, got {self.chunk_size}")
        for name in ("kd_weight", "ce_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise DistillError(f"{name} must be a non-negative number, got {value!r}")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise DistillError("kd_weight and ce_weight are both 0: nothing would be trained")

    def rows_per_chunk(self, logits_width: int) -> int:
        return self.chunk_size if self.chunk_size is not None else auto_chunk_rows(logits_width)


def auto_chunk_rows(logits_width: int) -> int:
    """The automatic chunk size: at most 256 MiB of fp32 logits and 1024 rows (256 rows at V=262k)."""
    return max(16, min(_MAX_AUTO_CHUNK_ROWS, _AUTO_CHUNK_ELEMENTS // max(1, logits_width)))


@dataclass
class LossSums:
    """Sums over the valid tokens of one micro-batch.

    kd: differentiable KD sum (already multiplied by T_train^2). ce: differentiable CE sum at T=1.
    n_tokens: number of valid tokens. kl_sum: detached true forward KL at the cache temperature
    (student logits / T_store vs the teacher as stored, top-k + tail), for logging and eval. top1_agree: detached count of tokens where the
    student's argmax equals the teacher's top-1 id.
    """

    kd: torch.Tensor
    ce: torch.Tensor
    n_tokens: int
    kl_sum: torch.Tensor
    top1_agree: torch.Tensor

    def detached(self) -> "LossSums":
        return LossSums(self.kd.detach(), self.ce.detach(), self.n_tokens, self.kl_sum, self.top1_agree)

    def __add__(self, other: "LossSums") -> "LossSums":
        """Accumulate micro-batch statistics (use on `detached()` values for logging)."""
        return LossSums(
            self.kd + other.kd,
            self.ce + other.ce,
            self.n_tokens + other.n_tokens,
            self.kl_sum + other.kl_sum,
            self.top1_agree + other.top1_agree,
        )


def combine_loss(sums: LossSums, n_step_tokens: int, config: KDLossConfig) -> torch.Tensor:
    """The training objective of one micro-batch: (kd_weight*kd + ce_weight*ce) / n_step_tokens.

    `n_step_tokens` is the number of valid tokens in the WHOLE optimizer step (every micro-batch of
    the gradient-accumulation window), so that accumulating the backward passes of k micro-batches
    gives exactly the gradient of one batch of all their tokens. Dividing each micro-batch by its
    own count instead (a shipped bug) over-weights tokens of short micro-batches.
    """
    if n_step_tokens < 0:
        raise ValueError(f"n_step_tokens must be >= 0, got {n_step_tokens}")
    total = config.kd_weight * sums.kd + config.ce_weight * sums.ce
    return total / max(int(n_step_tokens), 1)


def count_valid_tokens(targets: torch.Tensor) -> int:
    """Number of trained positions (targets != -100); sum it over a step's micro-batches."""
    return int((targets != IGNORE_INDEX).sum().item())


# --------------------------------------------------------------------------------------------------
# Pieces (all on [C, ...] rows of one chunk, fp32)


def _masked_logits(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """fp32 logits with the padded columns (>= vocab_size) at -inf."""
    z = logits.float()
    if vocab_size is not None and vocab_size < z.shape[-1]:
        cols = torch.arange(z.shape[-1], device=z.device)
        z = torch.where(cols >= vocab_size, float("-inf"), z)
    return z


def _student_sparse(s: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor):
    """Student log-probs at the cached ids [C,k], of the tail bucket [C] (exact, see module doc), and a
    [C] bool mask of the rows whose tail is not empty (some column outside the cache can hold mass)."""
    lq = s.gather(1, ids) - lse[:, None]
    rest = s.scatter(1, ids, float("-inf"))
    with torch.no_grad():
        has_tail = torch.isfinite(rest.amax(dim=1))
    # Rows whose tail is empty (k covers the vocabulary) get a dummy finite row: logsumexp of an
    # all -inf row has a NaN gradient, which a later where() would not remove.
    if bool(has_tail.all()):
        return lq, torch.logsumexp(rest, dim=1) - lse, has_tail
    rest = torch.where(has_tail[:, None], rest, 0.0)
    lq_tail = torch.where(has_tail, torch.logsumexp(rest, dim=1) - lse, float("-inf"))
    return lq, lq_tail, has_tail


def _teacher_sparse(lp: torch.Tensor, a: float, *, floor: bool = False, tail_rule: str = "uniform",
                    n_tail: int = 1, has_tail: torch.Tensor | None = None):
    """Teacher log-probs over cached ids + tail, re-tempered by exponent a and renormalised.

    `lp` are stored log-probs normalised over the full vocabulary. `n_tail` is the number of
    uncached tokens V - k (used by the "uniform" tail rule). `has_tail` [C] marks the rows where the
    student's tail is not empty; elsewhere the cached ids cover the vocabulary, so the teacher's tail
    is rounding error of the stored values and is dropped (see module doc). Returns (lt [C,k], lt_tail [C]).
    """
    lp = lp.float()
    total = torch.logsumexp(lp, dim=1)
    p_tail = -torch.expm1(torch.clamp(total, max=0.0))
    if floor:
        log_tail = torch.log(torch.clamp(p_tail, min=TAIL_EPS))
        lp = torch.clamp(lp, min=_LOG_TAIL_EPS)
    else:
        log_tail = torch.where(p_tail > TAIL_EPS, torch.log(torch.clamp(p_tail, min=TAIL_EPS)), float("-inf"))
    if has_tail is not None:
        log_tail = torch.where(has_tail, log_tail, float("-inf"))
    tail = a * log_tail
    if tail_rule == "uniform" and a != 1.0 and n_tail > 1:
        # (V-k) * (p_tail / (V-k))^a = p_tail^a * (V-k)^(1-a)
        tail = tail + (1.0 - a) * math.log(n_tail)
    joint = torch.cat([a * lp, tail[:, None]], dim=1)
    joint = joint - torch.logsumexp(joint, dim=1, keepdim=True)
    return joint[:, :-1], joint[:, -1]


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise sum_j p_j (log p_j - log q_j), with p_j = 0 terms exactly 0 (masked before use)."""
    p = torch.exp(log_p)
    present = p > 0
    diff = torch.where(present, log_p - log_q, 0.0)
    return torch.where(present, p * diff, 0.0).sum(dim=1)


def _safe_logaddexp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logaddexp whose gradient is not NaN where both inputs are -inf (the result is -inf there)."""
    both = torch.isinf(x) & torch.isinf(y) & (x < 0) & (y < 0)
    out = torch.logaddexp(torch.where(both, 0.0, x), torch.where(both, 0.0, y))
    return torch.where(both, float("-inf"), out)


def _divergence(kind: str, lt, lt_tail, lq, lq_tail, beta: float) -> torch.Tensor:
    """Per-row divergence between teacher (lt) and student (lq) over the k + 1 outcomes."""
    log_p = torch.cat([lt, lt_tail[:, None]], dim=1)
    log_q = torch.cat([lq, lq_tail[:, None]], dim=1)
    if kind in ("forward-kl", "forward-kl-renorm"):
        return _kl(log_p, log_q)
    if kind == "reverse-kl":
        return _kl(log_q, log_p)
    # jsd
    log_m = _safe_logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _renorm_pair(lt_topk: torch.Tensor, a: float, s: torch.Tensor, ids: torch.Tensor):
    """forward-kl-renorm: teacher and student both renormalised over the k cached ids (no tail)."""
    lt = torch.log_softmax(a * lt_topk.float(), dim=1)
    lq = torch.log_softmax(s.gather(1, ids), dim=1)
    neg_inf = torch.full(lt.shape[:1], float("-inf"), device=lt.device)
    return lt, neg_inf, lq, neg_inf


# --------------------------------------------------------------------------------------------------


def _weighted_terms(config: KDLossConfig, z, lse1, ids, lp, w, valid, stats_out: list | None):
    """KD sum of an estimator target (module doc, "Estimator targets"): sum_j w_j (log p_j - log q_j)."""
    T = float(config.temperature)
    s, lse = (z, lse1) if T == 1.0 else (z / T, torch.logsumexp(z / T, dim=1))
    lq = s.gather(1, ids) - lse[:, None]
    ok = valid if valid is not None else torch.ones_like(ids, dtype=torch.bool)
    diff = torch.where(ok, lp.float() - lq, 0.0)
    kd = (torch.where(ok, w.float(), 0.0) * diff).sum() * (T * T)
    if stats_out is not None:
        with torch.no_grad():
            from distill.cache.target import teacher_top1

            top1 = (z.argmax(dim=1) == teacher_top1(ids, lp, valid, w)).sum()
            stats_out.append((kd.detach() / (T * T), top1))
    return kd


def _chunk_terms(head, config: KDLossConfig, h, tgt, ids, lp, stats_out: list | None, w=None, valid=None):
    """KD and CE sums of one chunk; optionally appends detached (kl_sum, top1) stats to stats_out."""
    z = _masked_logits(head(h), config.vocab_size)  # [C, V] at T = 1 (raw, model-scaled)
    if w is not None:
        lse1 = torch.logsumexp(z, dim=1)
        ce = (lse1 - z.gather(1, tgt[:, None]).squeeze(1)).sum()
        return _weighted_terms(config, z, lse1, ids, lp, w, valid, stats_out), ce
    T = float(config.temperature)
    T_store = float(config.cache_temperature)
    a = T_store / T
    n_tail = max(1, (config.vocab_size or z.shape[-1]) - ids.shape[1])
    lse1 = torch.logsumexp(z, dim=1)
    ce = (lse1 - z.gather(1, tgt[:, None]).squeeze(1)).sum()

    if T == 1.0:
        s, lse = z, lse1
    else:
        s = z / T
        lse = torch.logsumexp(s, dim=1)
    if config.kind == "forward-kl-renorm":
        lt, lt_tail, lq, lq_tail = _renorm_pair(lp, a, s, ids)
    else:
        lq, lq_tail, has_tail = _student_sparse(s, lse, ids)
        lt, lt_tail = _teacher_sparse(lp, a, floor=config.kind == "reverse-kl", tail_rule=config.tail_rule,
                                      n_tail=n_tail, has_tail=has_tail)
    kd = _divergence(config.kind, lt, lt_tail, lq, lq_tail, config.beta).sum() * (T * T)

    if stats_out is not None:
        with torch.no_grad():
            # The reported KL is taken at the cache temperature: student logits / T_store against the
            # teacher as stored. (Student at T=1 against a teacher stored at T_store != 1 would not be
            # zero even for a student identical to the teacher.)
            if T == T_store and config.kind == "forward-kl":
                kl = kd.detach() / (T * T)
            else:
                s_store = z if T_store == 1.0 else z / T_store
                lq1, lq1_tail, has_tail1 = _student_sparse(s_store, torch.logsumexp(s_store, dim=1), ids)
                lt1, lt1_tail = _teacher_sparse(lp, 1.0, has_tail=has_tail1)
                kl = _divergence("forward-kl", lt1, lt1_tail, lq1, lq1_tail, 0.5).sum()
            top1 = (z.argmax(dim=1) == ids[:, 0]).sum()
            stats_out.append((kl.detach(), top1))
    return kd, ce


def _validate(hidden, targets, topk_ids, topk_logprobs, weights=None, valid=None):
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    n = hidden.shape[:-1].numel()
    if targets.numel() != n:
        raise ValueError(f"targets hold {targets.numel()} positions but hidden holds {n}")
    if topk_ids.shape != topk_logprobs.shape or topk_ids.numel() % max(n, 1) != 0:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} "
            f"must both be [..., k] over the {n} positions of hidden"
        )
    for name, t in (("weights", weights), ("valid", valid)):
        if t is not None and t.shape != topk_ids.shape:
            raise ValueError(f"target {name} {tuple(t.shape)} must have the shape of the ids {tuple(topk_ids.shape)}")
    if valid is not None and weights is None:
        raise ValueError("padded slots (valid) come only with weights: an exact top-k target has none")


def distillation_loss_sums(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    config: KDLossConfig | None = None,
    *,
    weights: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> LossSums:
    """KD and CE sums over the valid positions (targets != -100) of one micro-batch.

    hidden [N, H] (or [B, T, H]) final hidden states; head(h [C, H]) -> logits [C, V] (lm_head plus
    the model's logit scaling/soft-capping); targets [N] (-100 = not trained); topk_ids [N, m] and
    topk_logprobs [N, m], and for an estimator target `weights` [N, m] (and `valid` [N, m]), as in
    the decoded sparse target contract (distill/cache/target.py; `target_loss_sums` takes one whole).
    Only valid rows go through the head, a chunk at a time under checkpointing. Combine the result
    with `combine_loss`.
    """
    config = config or KDLossConfig()
    _validate(hidden, targets, topk_ids, topk_logprobs, weights, valid)
    if weights is not None and (config.kind != "forward-kl" or config.temperature != config.cache_temperature):
        raise DistillError(
            "an estimator target (sampled cache) serves only forward-kl at the cache temperature "
            f"({config.cache_temperature:g}), not {config.kind} at {config.temperature:g}"
        )
    H = hidden.shape[-1]
    hidden = hidden.reshape(-1, H)
    targets = targets.reshape(-1)
    k = topk_ids.shape[-1]
    topk_ids = topk_ids.reshape(-1, k)
    topk_logprobs = topk_logprobs.reshape(-1, k)
    if weights is not None:
        weights = weights.reshape(-1, k)
    if valid is not None:
        valid = valid.reshape(-1, k)

    idx = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    n = int(idx.numel())
    device = hidden.device
    if n == 0:
        zero = hidden[:0].sum().float()  # 0, still attached to the graph
        return LossSums(zero, zero.clone(), 0, torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device))

    h = hidden.index_select(0, idx)
    tgt = targets.index_select(0, idx).long()
    ids = topk_ids.index_select(0, idx).long()
    lp = topk_logprobs.index_select(0, idx)
    w = weights.index_select(0, idx) if weights is not None else None
    ok = valid.index_select(0, idx) if valid is not None else None
    limit = config.vocab_size
    bad_ids = (ids < 0) | ((ids >= limit) if limit is not None else torch.zeros_like(ids, dtype=torch.bool))
    bad_tgt = (tgt < 0) | ((tgt >= limit) if limit is not None else torch.zeros_like(tgt, dtype=torch.bool))
    if bool(bad_ids.any()) or bool(bad_tgt.any()):
        raise DistillError(
            f"teacher ids or targets fall outside the student vocabulary (size {limit}); "
            "the cache was made with another tokenizer: rebuild it or pick a matching student"
        )
    if torch.isnan(lp).any() or (lp > 1e-3).any():
        raise DistillError("cached teacher log-probs contain NaN or positive values; the cache is corrupt: rebuild it")

    width = getattr(head, "width", None)
    if not isinstance(width, int):
        with torch.no_grad():
            width = head(h[:1]).shape[-1]
    if limit is not None and limit > width:
        raise DistillError(f"vocab_size {limit} is larger than the student's logits width {width}")
    if int(ids.max()) >= width or int(tgt.max()) >= width:
        raise DistillError(f"teacher ids or targets exceed the student's logits width {width}; the cache does not fit this student")
    rows = config.rows_per_chunk(width)

    use_ckpt = torch.is_grad_enabled()
    kd_total = None
    ce_total = None
    kl_total = torch.zeros((), device=device)
    top1_total = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        stats: list = []
        # The last chunk is not checkpointed: autograd runs the most recently created nodes first,
        # so its saved logits are used and freed at the very start of the backward pass, before any
        # other chunk is recomputed; peak memory stays one chunk and a single-chunk batch (short
        # sequences, V <= 64k) pays no recomputation at all.
        last = start + rows >= n
        if use_ckpt and not last:
            # Stats are computed once, in the first (forward) call; the recomputation in the
            # backward pass only rebuilds what autograd saved.
            calls = {"n": 0}

            def fn(h_, tgt_, ids_, lp_, w_, ok_, _calls=calls, _stats=stats):
                _calls["n"] += 1
                return _chunk_terms(head, config, h_, tgt_, ids_, lp_, _stats if _calls["n"] == 1 else None, w_, ok_)

            kd, ce = checkpoint(fn, h[sl], tgt[sl], ids[sl], lp[sl], _rows(w, sl), _rows(ok, sl), use_reentrant=False)
        else:
            kd, ce = _chunk_terms(head, config, h[sl], tgt[sl], ids[sl], lp[sl], stats, _rows(w, sl), _rows(ok, sl))
        kd_total = kd if kd_total is None else kd_total + kd
        ce_total = ce if ce_total is None else ce_total + ce
        kl, top1 = stats[0]
        kl_total = kl_total + kl
        top1_total = top1_total + top1
    return LossSums(kd_total, ce_total, n, kl_total, top1_total)


def _rows(t: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if t is None else t[sl]


def target_loss_sums(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                     target, config: KDLossConfig | None = None) -> LossSums:
    """`distillation_loss_sums` for a decoded `SparseTarget` (any codec): `SparseTarget.from_dict(batch)`."""
    return distillation_loss_sums(hidden, head, targets, target.ids, target.logprobs, config,
                                  weights=target.weights, valid=target.valid)
