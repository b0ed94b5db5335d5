"""Codecs "sampled" and "topk+sampled": draws from the teacher, stored as distinct ids with counts.

sampled (parameters n, proposal_temperature, seed, value_dtype, pack_ids)
    n draws per trained position, with replacement, from the teacher's distribution p at the cache
    temperature, or from a flattened proposal r proportional to p^(1/proposal_temperature)
    (proposal_temperature > 1). Stored: the distinct ids drawn (increasing), how often each was drawn
    (c_j, summing to n), log p_j, and with a flattened proposal the row's log Z = log sum_i p_i^beta
    (beta = 1/proposal_temperature). Decoded weights: w_j = c_j / n, or (p_j / r_j) c_j / n with
    r_j = p_j^beta / Z, i.e. w_j = exp((1 - beta) log p_j + log Z) c_j / n.

topk+sampled (parameters k, n, seed, value_dtype, pack_ids)
    the exact top-k head (as codec topk) plus n draws from the tail, the teacher's distribution
    restricted to the other ids and renormalised. The tail mass is known (1 - the head's), so the tail
    needs no estimate of its size, only of its shape: lower variance than sampling everything at equal
    bytes when the head holds most of the mass. Decoded weights: head w_i = p_i, tail w_j =
    p_tail c_j / n, with p_tail = 1 - sum of the stored head probabilities.

Both decode to an estimator target (weights, padded slots marked invalid): E[sum_j w_j f(j)] = sum_j
p_j f(j), so the loss sum_j w_j (log p_j - log q_j) is an unbiased estimate of KL(p || q) and of its
gradient (docs/losses.md). Training temperatures: the cache temperature only (re-tempering draws is
not exact; the trainer refuses another temperature) and only the forward-kl loss.

Shard tensors (E = distinct ids over all rows of the shard):
    smp_nuniq   [R] uint8 (or packed, bits_for(n))          distinct ids of each row
    smp_ids     [E] id dtype (or smp_ids_packed, ceil(log2 V) bits each)
    smp_counts  [E] uint8 (or smp_counts_packed: c - 1 in bits_for(n - 1) bits each)
    smp_logprobs [E] value dtype                            log p_j at the cache temperature
    smp_log_z   [R] fp32, only with a flattened proposal
plus, for topk+sampled, the head tensors of codec topk (topk_ids[_packed], topk_logprobs).
Draws are seeded per row (sample index, position, `seed`; distill/cache/codecs/sampling.py), and drawn
by the sampler the parameter `sampler` names (2, two-level inverse CDF, since builds got as fast as
top-k ones; 1 in caches built before, which lack the parameter). The two give different bytes for
the same seed, so a partial cache of one is not resumed by a build with the other.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from distill.cache.codecs import ID_TAGS, Codec, CodecError, CodecShard
from distill.cache.codecs import bits as bitpack
from distill.cache.codecs.sampling import DEFAULT_SAMPLER, SAMPLERS, draw, draw_blocked, uniforms, unique_counts
from distill.cache.codecs.topk import TopKHead
from distill.cache.codecs.values import (
    VALUE_DTYPES,
    check_value_dtype,
    load_values,
    max_row_mass,
    store_values,
    value_bits,
    values_fp32,
)
from distill.cache.target import SparseTarget
from distill.errors import DistillError

T_NUNIQ = "smp_nuniq"
T_IDS = "smp_ids"
T_COUNTS = "smp_counts"
T_LOGPROBS = "smp_logprobs"
T_LOG_Z = "smp_log_z"
PACKED = "_packed"
MAX_DRAWS = 255


def _check_sampler(params) -> int:
    """The manifest's `sampler` (sampling.py); absent in caches built before sampler 2, which used 1."""
    s = params.get("sampler", 1)
    if s not in SAMPLERS:
        raise DistillError(f"codec parameter sampler={s!r} is unknown (this distill knows {list(SAMPLERS)}): upgrade distill")
    return int(s)


def _exp_rows(x: torch.Tensor, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, m, log sum w): w = exp(beta (x - m)) fp32 with m the row max, in one buffer. The log-partition
    log sum exp(x) = m + log sum w at beta = 1, so one exp pass serves both the sampler and the log-probs."""
    m = x.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    w = torch.sub(x, m)
    if beta != 1.0:
        w.mul_(beta)
    w.exp_()
    return w, m, torch.log(w.sum(1, keepdim=True))


def _check_n(n, flag="--samples") -> int:
    if not isinstance(n, int) or not 1 <= n <= MAX_DRAWS:
        raise DistillError(f"{flag} must be an integer in 1..{MAX_DRAWS} (draws per position), got {n!r}")
    return int(n)


class _Draws:
    """The ragged draw tensors (smp_*) of a shard: encode, open, verify; shared by both codecs."""

    def __init__(self, n: int, vocab_size: int, id_dtype: str, value_dtype: str, pack: bool, log_z: bool):
        self.n, self.vocab_size, self.id_dtype, self.value_dtype, self.pack, self.log_z = (
            n, vocab_size, id_dtype, value_dtype, pack, log_z)
        self.id_bits = bitpack.bits_for(vocab_size - 1)
        self.count_bits = bitpack.bits_for(n - 1)
        self.nuniq_bits = bitpack.bits_for(n)

    def names(self) -> tuple[str, ...]:
        sfx = PACKED if self.pack else ""
        return (T_NUNIQ + sfx, T_IDS + sfx, T_COUNTS + sfx, T_LOGPROBS) + ((T_LOG_Z,) if self.log_z else ())

    def entry_bits(self) -> int:
        if self.pack:
            return self.id_bits + self.count_bits + value_bits(self.value_dtype)
        return 8 * np.dtype(self.id_dtype).itemsize + 8 + value_bits(self.value_dtype)

    def row_bits(self) -> int:
        return (self.nuniq_bits if self.pack else 8) + (32 if self.log_z else 0)

    def encode(self, ids: torch.Tensor, counts: torch.Tensor, lp: torch.Tensor, log_z: torch.Tensor | None):
        counts = counts.reshape(-1, self.n).long()
        ids = ids.reshape(-1, self.n).long()
        lp = lp.reshape(-1, self.n).float()
        present = counts > 0
        nuniq = present.sum(1).numpy()
        flat_ids = ids[present].numpy()
        flat_counts = counts[present].numpy()
        out: dict[str, torch.Tensor] = {}
        if self.pack:
            out[T_NUNIQ + PACKED] = torch.from_numpy(bitpack.pack(nuniq, self.nuniq_bits))
            out[T_IDS + PACKED] = torch.from_numpy(bitpack.pack(flat_ids, self.id_bits))
            out[T_COUNTS + PACKED] = torch.from_numpy(bitpack.pack(flat_counts - 1, self.count_bits))
        else:
            from distill.cache.codecs import ID_TORCH

            out[T_NUNIQ] = torch.from_numpy(nuniq.astype(np.uint8))
            out[T_IDS] = torch.from_numpy(flat_ids).to(ID_TORCH[self.id_dtype])
            out[T_COUNTS] = torch.from_numpy(flat_counts.astype(np.uint8))
        out[T_LOGPROBS] = store_values(lp[present], self.value_dtype)
        if self.log_z:
            out[T_LOG_Z] = log_z.reshape(-1).float().contiguous()
        return out

    def open(self, maps) -> "_DrawsShard":
        return _DrawsShard(self, maps)

    def verify(self, maps, num_rows: int, *, zero_rows_ok: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Check the draw tensors; return (nuniq [R], ids [E], counts [E], logprobs fp32 [E])."""
        if self.pack:
            for name in (T_NUNIQ, T_IDS, T_COUNTS):
                tag, arr = maps[name + PACKED]
                if tag != "U8" or arr.ndim != 1:
                    raise CodecError(f"{name}{PACKED} is not a uint8 stream")
            if maps[T_NUNIQ + PACKED][1].shape[0] != bitpack.packed_nbytes(num_rows, self.nuniq_bits):
                raise CodecError(f"{T_NUNIQ}{PACKED} does not hold {num_rows} rows")
            nuniq = bitpack.unpack(maps[T_NUNIQ + PACKED][1], self.nuniq_bits, 0, num_rows)
        else:
            tag, arr = maps[T_NUNIQ]
            if tag != "U8" or arr.shape != (num_rows,):
                raise CodecError(f"{T_NUNIQ} has dtype {tag} and shape {arr.shape}, expected U8 ({num_rows},)")
            nuniq = np.asarray(arr, dtype=np.int64)
        lo = 0 if zero_rows_ok else 1
        if nuniq.size and (nuniq.min() < lo or nuniq.max() > self.n):
            raise CodecError(f"a row holds {int(nuniq.max()) if nuniq.max() > self.n else int(nuniq.min())} distinct draws, "
                             f"outside {lo}..{self.n}")
        E = int(nuniq.sum())
        if self.pack:
            for name, b in ((T_IDS, self.id_bits), (T_COUNTS, self.count_bits)):
                if maps[name + PACKED][1].shape[0] != bitpack.packed_nbytes(E, b):
                    raise CodecError(f"{name}{PACKED} does not hold the {E} entries the rows count")
            ids = bitpack.unpack(maps[T_IDS + PACKED][1], self.id_bits, 0, E)
            counts = bitpack.unpack(maps[T_COUNTS + PACKED][1], self.count_bits, 0, E) + 1
        else:
            tag_i, ids_a = maps[T_IDS]
            tag_c, counts_a = maps[T_COUNTS]
            if tag_i != ID_TAGS[self.id_dtype] or tag_c != "U8" or ids_a.shape != (E,) or counts_a.shape != (E,):
                raise CodecError(f"draw ids/counts have dtypes {tag_i}/{tag_c} and shapes {ids_a.shape}/{counts_a.shape}, "
                                 f"expected {ID_TAGS[self.id_dtype]}/U8 ({E},)")
            ids = np.asarray(ids_a, dtype=np.int64)
            counts = np.asarray(counts_a, dtype=np.int64)
        tag_v, vals = maps[T_LOGPROBS]
        if tag_v != VALUE_DTYPES[self.value_dtype] or vals.shape != (E,):
            raise CodecError(f"{T_LOGPROBS} has dtype {tag_v} and shape {vals.shape}, expected "
                             f"{VALUE_DTYPES[self.value_dtype]} ({E},)")
        if self.log_z:
            tag_z, z = maps[T_LOG_Z]
            if tag_z != "F32" or z.shape != (num_rows,):
                raise CodecError(f"{T_LOG_Z} has dtype {tag_z} and shape {z.shape}, expected F32 ({num_rows},)")
            if not np.all(np.isfinite(z)) or np.any(np.asarray(z) < -1e-3):
                raise CodecError("proposal normalisers log Z are not finite or below 0")
        if E == 0:
            return nuniq, ids, counts, np.zeros(0, np.float32)
        if ids.max() >= self.vocab_size:
            raise CodecError("draw id past the tokenizer length")
        if counts.min() < 1:
            raise CodecError("a stored draw count is 0")
        row = np.repeat(np.arange(num_rows), nuniq)
        sums = np.bincount(row, weights=counts, minlength=num_rows).astype(np.int64)
        bad = (sums != self.n) & (nuniq > 0)
        if bad.any():
            r = int(np.nonzero(bad)[0][0])
            raise CodecError(f"the draw counts of row {r} sum to {int(sums[r])}, not n={self.n}")
        same_row = row[1:] == row[:-1]
        if np.any(same_row & (ids[1:] <= ids[:-1])):
            raise CodecError("draw ids of a row are not distinct and increasing")
        v = values_fp32(tag_v, vals)
        if not np.all(np.isfinite(v)) or np.any(v > 1e-3):
            raise CodecError("draw log-probs not finite or above 0")
        return nuniq, ids, counts, v


class _DrawsShard:
    def __init__(self, draws: _Draws, maps):
        self.d = draws
        if draws.pack:
            self.nuniq_stream = maps[T_NUNIQ + PACKED][1]
            self.ids = maps[T_IDS + PACKED][1]
            self.counts = maps[T_COUNTS + PACKED][1]
        else:
            self.ids = maps[T_IDS][1]
            self.counts = maps[T_COUNTS][1]
        self.tag, self.vals = maps[T_LOGPROBS]
        self.log_z = maps[T_LOG_Z][1] if draws.log_z else None
        self._offsets: np.ndarray | None = None
        self._maps = maps

    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            if self.d.pack:
                rows = (self.nuniq_stream.shape[0] * 8) // self.d.nuniq_bits
                nuniq = bitpack.unpack(self.nuniq_stream, self.d.nuniq_bits, 0, rows)
            else:
                nuniq = np.asarray(self._maps[T_NUNIQ][1], dtype=np.int64)
            self._offsets = np.concatenate([[0], np.cumsum(nuniq)]).astype(np.int64)
        return self._offsets

    def rows(self, a: int, b: int):
        """Padded [b-a, n] (ids, counts, logprobs fp32, valid) and the rows' log Z (or None)."""
        off = self.offsets()
        e0, e1 = int(off[a]), int(off[b])
        nuniq = np.diff(off[a:b + 1])
        R, n = b - a, self.d.n
        if self.d.pack:
            ids = bitpack.unpack(self.ids, self.d.id_bits, e0, e1 - e0)
            counts = bitpack.unpack(self.counts, self.d.count_bits, e0, e1 - e0) + 1
        else:
            ids = np.asarray(self.ids[e0:e1]).astype(np.int64)
            counts = np.asarray(self.counts[e0:e1]).astype(np.int64)
        lp = load_values(self.tag, self.vals[e0:e1])
        row = np.repeat(np.arange(R), nuniq)
        slot = np.arange(e1 - e0) - np.repeat(off[a:b] - e0, nuniq)
        P_ids = torch.zeros((R, n), dtype=torch.int64)
        P_counts = torch.zeros((R, n), dtype=torch.float32)
        P_lp = torch.zeros((R, n), dtype=torch.float32)
        valid = torch.zeros((R, n), dtype=torch.bool)
        r_t, s_t = torch.from_numpy(row), torch.from_numpy(slot)
        P_ids[r_t, s_t] = torch.from_numpy(ids)
        P_counts[r_t, s_t] = torch.from_numpy(counts.astype(np.float32))
        P_lp[r_t, s_t] = lp
        valid[r_t, s_t] = True
        log_z = torch.from_numpy(np.array(self.log_z[a:b], dtype=np.float32)) if self.log_z is not None else None
        return P_ids, P_counts, P_lp, valid, log_z


class SampledCodec(Codec):
    name = "sampled"
    weighted = True
    needs_full_rows = True
    exact_temperatures = "the cache temperature only (draws cannot be re-tempered exactly); loss forward-kl only"

    def __init__(self, params: Mapping[str, Any], *, vocab_size: int, id_dtype: str | None = None):
        super().__init__(params, vocab_size=vocab_size, id_dtype=id_dtype)
        p = self.params
        n = _check_n(p.get("n"))
        tau = float(p.get("proposal_temperature", 1.0))
        if not (math.isfinite(tau) and tau >= 1.0):
            raise DistillError(f"--proposal-temperature must be >= 1 (1 = draw from the teacher, > 1 = flatter), got {tau}")
        self.params = {"n": n, "proposal_temperature": tau, "seed": int(p.get("seed", 0)),
                       "value_dtype": check_value_dtype(p.get("value_dtype", "fp16")), "pack_ids": bool(p.get("pack_ids", False)),
                       "sampler": _check_sampler(p)}
        self.n, self.beta = n, 1.0 / tau
        self.draws = _Draws(n, self.vocab_size, self.id_dtype, self.value_dtype, self.params["pack_ids"], tau != 1.0)

    @classmethod
    def params_from_options(cls, *, samples: int | None = None, proposal_temperature: float = 1.0, seed: int = 0,
                            value_dtype: str = "fp16", pack_ids: bool = False, top_k: int | None = None, **_unused):
        if samples is None:
            raise DistillError("--codec sampled needs --samples N (draws per position)")
        if top_k is not None:
            raise DistillError("--codec sampled stores no top-k head; drop --top-k (or use --codec topk+sampled)")
        return {"n": _check_n(samples), "proposal_temperature": float(proposal_temperature), "seed": int(seed),
                "value_dtype": check_value_dtype(value_dtype), "pack_ids": bool(pack_ids), "sampler": DEFAULT_SAMPLER}

    @property
    def seed(self) -> int:
        return int(self.params["seed"])

    @property
    def width(self) -> int:
        return self.n

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.draws.names()

    def empty_rows(self) -> dict[str, torch.Tensor]:
        rows = {"ids": torch.zeros((0, self.n), dtype=torch.int64), "logprobs": torch.zeros((0, self.n)),
                "counts": torch.zeros((0, self.n), dtype=torch.int64)}
        if self.draws.log_z:
            rows["log_z"] = torch.zeros(0)
        return rows

    def reduce(self, x: torch.Tensor, seeds: np.ndarray | None) -> dict[str, torch.Tensor]:
        u = uniforms(seeds, self.n)
        if self.params["sampler"] == 2:
            w, m, log_sw = _exp_rows(x, self.beta)
            if self.beta == 1.0:
                lse, rows = m + log_sw, {}
            else:  # w = (p Z_x)^beta: log Z = log sum_i p_i^beta = beta (m - lse) + log sum w
                lse = torch.logsumexp(x, dim=-1, keepdim=True)
                rows = {"log_z": (self.beta * (m - lse) + log_sw).squeeze(1)}
            ids, counts = unique_counts(draw_blocked(w, u), self.n)
            del w
            rows.update(ids=ids, logprobs=x.gather(1, ids) - lse, counts=counts)
            return rows
        # sampler 1 (caches built before sampler 2): a float64 CDF over the whole row
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        lp = x - lse
        rows = {}
        if self.beta != 1.0:
            scaled = self.beta * lp
            rows["log_z"] = torch.logsumexp(scaled, dim=-1)
            picks = draw(scaled, u)
        else:
            picks = draw(lp, u)
        ids, counts = unique_counts(picks, self.n)
        rows.update(ids=ids, logprobs=lp.gather(1, ids), counts=counts)
        return rows

    def encode(self, rows):
        return self.draws.encode(rows["ids"], rows["counts"], rows["logprobs"], rows.get("log_z")), 0.0

    def open(self, maps) -> CodecShard:
        return _SampledShard(self, self.draws.open(maps))

    def verify(self, maps, num_rows: int) -> None:
        nuniq, ids, counts, v = self.draws.verify(maps, num_rows, zero_rows_ok=False)
        if v.size:
            row = np.repeat(np.arange(num_rows), nuniq)
            mass = np.bincount(row, weights=np.exp(v.astype(np.float64)), minlength=num_rows)
            limit = max_row_mass(self.n, self.value_dtype)
            if np.any(mass > limit):
                raise CodecError(f"probabilities of a row's distinct draws sum to {mass.max():.4f}, past 1 by more "
                                 f"than {self.value_dtype} rounding allows ({limit:.4f})")

    def bytes_per_row(self) -> float | None:
        return None

    def nominal_bytes(self, mean_distinct: float) -> float:
        """Bytes per row for a given mean number of distinct draws (what `cache info` measures)."""
        return (self.draws.row_bits() + mean_distinct * self.draws.entry_bits()) / 8.0


class _SampledShard(CodecShard):
    def __init__(self, codec: SampledCodec, draws: _DrawsShard):
        self.codec, self.draws = codec, draws

    def decode(self, a: int, b: int, width: int | None = None) -> SparseTarget:
        ids, counts, lp, valid, log_z = self.draws.rows(a, b)
        w = counts / float(self.codec.n)
        if log_z is not None:  # importance weights p/r for the flattened proposal r = p^beta / Z
            w = w * torch.exp((1.0 - self.codec.beta) * lp + log_z[:, None])
            w = torch.where(valid, w, 0.0)
        return SparseTarget(ids, lp, w, valid)


class TopKSampledCodec(Codec):
    name = "topk+sampled"
    weighted = True
    needs_full_rows = True
    exact_temperatures = "the cache temperature only (the tail draws cannot be re-tempered exactly); loss forward-kl only"

    def __init__(self, params: Mapping[str, Any], *, vocab_size: int, id_dtype: str | None = None):
        super().__init__(params, vocab_size=vocab_size, id_dtype=id_dtype)
        p = self.params
        k = p.get("k")
        if not isinstance(k, int) or k < 1:
            raise DistillError(f"codec topk+sampled needs k >= 1 (--top-k), got {k!r}")
        n = _check_n(p.get("n"))
        self.params = {"k": int(k), "n": n, "seed": int(p.get("seed", 0)),
                       "value_dtype": check_value_dtype(p.get("value_dtype", "fp16")), "pack_ids": bool(p.get("pack_ids", False)),
                       "sampler": _check_sampler(p)}
        self.n = n
        self.head = TopKHead(int(k), self.vocab_size, self.id_dtype, self.value_dtype, self.params["pack_ids"])
        self.draws = _Draws(n, self.vocab_size, self.id_dtype, self.value_dtype, self.params["pack_ids"], False)

    @classmethod
    def params_from_options(cls, *, top_k: int | None = None, samples: int | None = None, seed: int = 0,
                            value_dtype: str = "fp16", pack_ids: bool = False, proposal_temperature: float = 1.0, **_unused):
        if top_k is None or samples is None:
            raise DistillError("--codec topk+sampled needs --top-k K (exact head) and --samples N (tail draws)")
        if top_k < 1:
            raise DistillError(f"--top-k must be at least 1, got {top_k}")
        if proposal_temperature != 1.0:
            raise DistillError("--proposal-temperature applies to --codec sampled only")
        return {"k": int(top_k), "n": _check_n(samples), "seed": int(seed), "value_dtype": check_value_dtype(value_dtype),
                "pack_ids": bool(pack_ids), "sampler": DEFAULT_SAMPLER}

    @property
    def k(self) -> int:
        return int(self.params["k"])

    @property
    def seed(self) -> int:
        return int(self.params["seed"])

    @property
    def width(self) -> int:
        return self.k + self.n

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.head.names() + self.draws.names()

    def empty_rows(self) -> dict[str, torch.Tensor]:
        return {"ids": torch.zeros((0, self.k), dtype=torch.int64), "logprobs": torch.zeros((0, self.k)),
                "tail_ids": torch.zeros((0, self.n), dtype=torch.int64), "tail_logprobs": torch.zeros((0, self.n)),
                "tail_counts": torch.zeros((0, self.n), dtype=torch.int64)}

    def reduce(self, x: torch.Tensor, seeds: np.ndarray | None) -> dict[str, torch.Tensor]:
        v, i = torch.topk(x, self.k, dim=-1, sorted=True)
        if self.params["sampler"] == 2:
            w, m, log_sw = _exp_rows(x)
            lse = m + log_sw
            w.scatter_(1, i, 0.0)  # the tail: the head's ids excluded
            empty = ~(w.sum(1) > 0)
            ids, counts = unique_counts(draw_blocked(w, uniforms(seeds, self.n)), self.n)
            del w
            counts = torch.where(empty[:, None], 0, counts)
            return {"ids": i, "logprobs": v - lse, "tail_ids": ids, "tail_logprobs": x.gather(1, ids) - lse,
                    "tail_counts": counts}
        # sampler 1 (caches built before sampler 2): a float64 CDF over the whole row
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        lp = x - lse
        tail = lp.scatter(1, i, float("-inf"))
        ids, counts = unique_counts(draw(tail, uniforms(seeds, self.n)), self.n)
        # a row whose tail holds no mass (k covers every token with p > 0) keeps no draws
        empty = ~torch.isfinite(tail.amax(dim=1))
        counts = torch.where(empty[:, None], 0, counts)
        return {"ids": i, "logprobs": v - lse, "tail_ids": ids, "tail_logprobs": lp.gather(1, ids), "tail_counts": counts}

    def encode(self, rows):
        head, tail_mass = self.head.encode(rows["ids"], rows["logprobs"])
        out = dict(head)
        out.update(self.draws.encode(rows["tail_ids"], rows["tail_counts"], rows["tail_logprobs"], None))
        return out, tail_mass

    def open(self, maps) -> CodecShard:
        return _TopKSampledShard(self, self.head.open(maps), self.draws.open(maps))

    def verify(self, maps, num_rows: int) -> None:
        head_ids, head_v = self.head.verify(maps, num_rows)
        nuniq, ids, counts, v = self.draws.verify(maps, num_rows, zero_rows_ok=True)
        if not v.size:
            return
        row = np.repeat(np.arange(num_rows), nuniq)
        if np.any((head_ids[row] == ids[:, None]).any(axis=1)):
            raise CodecError("a tail draw repeats an id of its row's top-k head")
        mass = np.exp(head_v.astype(np.float64)).sum(1)
        mass += np.bincount(row, weights=np.exp(v.astype(np.float64)), minlength=num_rows)
        limit = max_row_mass(self.k + self.n, self.value_dtype)
        if np.any(mass > limit):
            raise CodecError(f"probabilities of a row's head and tail draws sum to {mass.max():.4f}, past 1 by more "
                             f"than {self.value_dtype} rounding allows ({limit:.4f})")

    def nominal_bytes(self, mean_distinct: float) -> float:
        return self.head.bytes_per_row() + (self.draws.row_bits() + mean_distinct * self.draws.entry_bits()) / 8.0


class _TopKSampledShard(CodecShard):
    def __init__(self, codec: TopKSampledCodec, head, draws: _DrawsShard):
        self.codec, self.head, self.draws = codec, head, draws

    def decode(self, a: int, b: int, width: int | None = None) -> SparseTarget:
        h = self.head.decode(a, b)
        ids, counts, lp, valid, _ = self.draws.rows(a, b)
        p_head = h.logprobs.exp()
        p_tail = torch.clamp(1.0 - p_head.sum(1, keepdim=True), min=0.0)
        w = torch.cat([p_head, p_tail * counts / float(self.codec.n)], dim=1)
        R = ids.shape[0]
        return SparseTarget(torch.cat([h.ids, ids], 1), torch.cat([h.logprobs, lp], 1), w,
                            torch.cat([torch.ones((R, self.codec.k), dtype=torch.bool), valid], 1))
