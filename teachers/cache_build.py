"""Run a teacher over a data set and write its top-k next-token log-probs to a cache (the runner).

Order of work, so that mistakes cost seconds, not hours: check arguments and the output directory, load
and tokenize the data, load the tokenizer (k vs vocabulary), then the model, then open the writer (which
refuses a cache made with something else), then stream shards.

Shard j always holds samples [j*shard_size, (j+1)*shard_size) in data order; inside a shard, samples are
batched by length (little padding). Batching is a pure function of the data and options, so a resumed
build computes exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from distill.cache.format import Manifest, id_dtype_for, tokenizer_fingerprint
from distill.cache.writer import CachedSample, CacheWriter, check_output_dir, trained_positions
from distill.data.records import encode_record, load_records
from distill.errors import DistillError

VALUE_DTYPE_CHOICES = ("fp16", "bf16")
# Test hook: seconds to sleep after each committed shard, so a test can SIGKILL a build mid-way.
_SHARD_DELAY_ENV = "DISTILL_TEST_SHARD_DELAY"


@torch.no_grad()
def topk_logprobs(logits: torch.Tensor, vocab: int, k: int, temperature: float, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax(logits[:, :vocab] / T) in fp32: (ids [R,k] int64, log-probs [R,k] fp32, descending).

    Columns past `vocab` (padded embedding rows) are dropped before the normaliser, never zero-filled.
    Rows are processed in chunks so that the fp32 copy stays small; top-k is taken on the scaled logits and
    the log-normaliser subtracted afterwards (same result as log_softmax, one full pass fewer).
    """
    R = logits.shape[0]
    ids = torch.empty((R, k), dtype=torch.int64, device=logits.device)
    vals = torch.empty((R, k), dtype=torch.float32, device=logits.device)
    inv_t = 1.0 / float(temperature)
    for a in range(0, R, chunk):
        x = logits[a:a + chunk, :vocab].float()
        if inv_t != 1.0:
            x = x * inv_t
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        v, i = torch.topk(x, k, dim=-1, sorted=True)
        vals[a:a + chunk] = v - lse
        ids[a:a + chunk] = i
    return ids, vals


def length_batches(lengths: Sequence[int], *, batch_size: int, batch_tokens: int | None) -> list[list[int]]:
    """Group indices (local to `lengths`) into batches of similar length, longest first, deterministically."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = max(lengths[cur[0]] if cur else lengths[i], 1)
        if cur and (len(cur) >= batch_size or (batch_tokens and (len(cur) + 1) * width > batch_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(max(len(s) for s in seqs), 1)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        att[b, : len(s)] = 1
    return ids.to(device), att.to(device)


@torch.no_grad()
def teacher_forward(model, seqs: Sequence[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    """Plain right-padded forward of a batch; returns logits [B, T, W] (model dtype, on device)."""
    ids, att = _pad(seqs, pad_id, device)
    return model(input_ids=ids, attention_mask=att, use_cache=False).logits


class RowScorer:
    """Teacher logits for selected (sequence, position) rows of a batch, without [B, T, V] logits if possible.

    Fast path: run the decoder body for hidden states and apply the model's own head (lm_head plus its logit
    scaling / soft-capping, `distill.models.head`) to the trained rows only, a chunk at a time. Prompt positions
    and padding never reach lm_head, and peak memory is one chunk of rows x vocabulary, not B x T x V.
    The head is checked against the model's own forward once; a model whose forward does something the
    head does not reproduce falls back to full logits.
    """

    def __init__(self, model, probe: Sequence[int], pad_id: int, device):
        from distill.models.head import verify_head

        self.model, self.pad_id, self.device = model, pad_id, device
        self.fast = True
        probe = list(probe)[:16] or [pad_id]
        try:
            ids, att = _pad([probe], pad_id, device)
            tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2
            verify_head(model, ids, att, atol=tol)
        except DistillError:
            self.fast = False

    @torch.no_grad()
    def topk(self, seqs, positions, vocab: int, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [R, k], log-probs [R, k]) for the rows `positions` (a list of position arrays per sequence)."""
        b_idx = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(positions)]).to(self.device)
        t_idx = torch.cat([torch.as_tensor(p, dtype=torch.long) for p in positions]).to(self.device)
        if not self.fast:
            logits = teacher_forward(self.model, seqs, self.pad_id, self.device)
            rows = logits[b_idx, t_idx]
            del logits
            return topk_logprobs(rows, vocab, k, temperature)
        from distill.models.head import model_hidden_and_head

        ids, att = _pad(seqs, self.pad_id, self.device)
        hidden, head = model_hidden_and_head(self.model, ids, att)
        rows = hidden[b_idx, t_idx]
        del hidden
        R = rows.shape[0]
        out_ids = torch.empty((R, k), dtype=torch.int64, device=rows.device)
        out_lp = torch.empty((R, k), dtype=torch.float32, device=rows.device)
        chunk = max(16, (1 << 25) // max(vocab, 1))  # ~128 MB of fp32 logits per chunk
        for a in range(0, R, chunk):
            i, v = topk_logprobs(head(rows[a:a + chunk]), vocab, k, temperature, chunk=chunk)
            out_ids[a:a + chunk], out_lp[a:a + chunk] = i, v
        return out_ids, out_lp


def _data_fingerprint(samples: Sequence[tuple[list[int], list[int]]]) -> str:
    h = hashlib.sha256()
    for ids, mask in samples:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(mask, dtype=np.uint8).tobytes())
        h.update(b"#")
    return "sha256:" + h.hexdigest()


def _logits_width(model) -> int:
    emb = model.get_output_embeddings()
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def build_cache(
    teacher: str,
    data: str | Path | None,
    out: str | Path,
    *,
    top_k: int,
    temperature: float = 1.0,
    max_length: int = 2048,
    dtype: str = "fp16",
    batch_size: int = 8,
    batch_tokens: int | None = 16384,
    shard_size: int = 1024,
    fields: Mapping[str, str] | None = None,
    split: str | None = None,
    data_config: str | None = None,
    limit: int | None = None,
    as_chat: bool = False,
    records: Sequence[Mapping[str, Any]] | None = None,
    trust_remote_code: bool = False,
    quant: str = "none",
    device: str | None = None,
    teacher_dtype: str | None = None,
    revision: str | None = None,
    rank: int = 0,
    progress: bool = True,
    log=None,
) -> Manifest:
    """Build (or resume) a teacher cache in `out` and return its final manifest.

    `data` is a path / hub id read by `load_records`; `records` (already normalised dicts) replaces it when
    the pipeline has them in memory. Raises DistillError for every user mistake, before any output is written.
    """
    from distill.models import load_model, load_tokenizer, model_identity, resolve_source

    say = log or (lambda msg: print(msg, file=sys.stderr))
    if top_k < 1:
        raise DistillError(f"--top-k must be at least 1, got {top_k}")
    if not temperature > 0:
        raise DistillError(f"--temperature must be positive, got {temperature}")
    if dtype not in VALUE_DTYPE_CHOICES:
        raise DistillError(f"--dtype must be one of {', '.join(VALUE_DTYPE_CHOICES)}, got {dtype!r}")
    if max_length < 2:
        raise DistillError(f"--max-length must be at least 2, got {max_length}")
    if batch_size < 1 or shard_size < 1 or (batch_tokens is not None and batch_tokens < 1):
        raise DistillError("--batch-size, --batch-tokens and --shard-size must be positive")
    out = Path(out)
    check_output_dir(out)

    if records is None:
        if data is None:
            raise DistillError("give --data (a file, a saved datasets directory or a hub data set id)")
        records = load_records(data, fields=fields, split=split, config=data_config, limit=limit, as_chat=as_chat)
    else:  # rows from memory: same field mapping and checks as rows from a file
        from distill.data.records import normalise_record

        rows = list(records)[:limit] if limit is not None else list(records)
        records = [normalise_record(r, fields, as_chat=as_chat) for r in rows]
    if not records:
        raise DistillError("no records to cache")

    source = resolve_source(teacher, what="teacher")
    tok = load_tokenizer(source, what="teacher", trust_remote_code=trust_remote_code, revision=revision, require_pad=True)
    vocab = len(tok)
    if top_k > vocab:
        raise DistillError(f"--top-k {top_k} is larger than the teacher's vocabulary ({vocab} tokens); use a smaller k")

    samples: list[tuple[list[int], list[int]]] = []
    truncated = dropped_tokens = no_trained = 0
    for rec in records:
        ids, mask = encode_record(tok, rec)
        if len(ids) > max_length:
            truncated += 1
            dropped_tokens += len(ids) - max_length
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask[1:]):
            no_trained += 1
        samples.append((ids, mask))
    n = len(samples)

    model = load_model(source, what="teacher", device=device, quant=quant, dtype=teacher_dtype,
                       trust_remote_code=trust_remote_code, revision=revision)
    dev = next(model.parameters()).device
    width = _logits_width(model)
    if width < vocab:
        raise DistillError(f"teacher logits width {width} is smaller than its tokenizer ({vocab} tokens); the tokenizer does not belong to this model")

    manifest = Manifest(
        teacher=model_identity(model, source, quant=quant, revision=revision),
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        tokenizer_length=vocab,
        logits_width=width,
        pad_id=int(tok.pad_token_id),
        k=int(top_k),
        temperature=float(temperature),
        value_dtype=dtype,
        id_dtype=id_dtype_for(vocab),
        num_samples=n,
        data={
            "source": str(data) if data is not None else "records",
            "fingerprint": _data_fingerprint(samples),
            "max_length": int(max_length),
            "shard_size": int(shard_size),
        },
        build={
            "truncated_samples": truncated, "truncated_tokens": dropped_tokens,
            "samples_without_trained_tokens": no_trained, "teacher_dtype": str(next(model.parameters()).dtype),
        },
    )
    writer = CacheWriter(out, manifest, rank=rank)
    if writer.manifest.complete:
        say(f"cache in {out} is already complete ({n} sequences); nothing to do")
        return writer.manifest
    if truncated:
        say(f"truncated {truncated} of {n} sequences to --max-length {max_length} ({dropped_tokens} tokens dropped)")
    if no_trained:
        say(f"warning: {no_trained} sequences have no trained tokens (empty completion or cut by --max-length)")

    scorer = RowScorer(model, samples[0][0], manifest.pad_id, dev)
    manifest.build["scoring"] = "hidden+head on trained rows" if scorer.fast else "full logits"
    done = writer.done_indices()
    num_shards = (n + shard_size - 1) // shard_size
    todo = [j for j in range(num_shards) if j not in done]
    remaining = sum(min(shard_size, n - j * shard_size) for j in todo)
    delay = float(os.environ.get(_SHARD_DELAY_ENV, "0") or 0)

    from tqdm.auto import tqdm

    bar = tqdm(total=remaining, unit="seq", desc="cache", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    if done:
        say(f"resuming: {len(done)} of {num_shards} shards already in {out}")
    t0, c0 = time.perf_counter(), time.process_time()
    tokens_done = 0
    pool = ThreadPoolExecutor(max_workers=1)  # the shard write overlaps the next shard's forward passes
    pending: Future | None = None
    try:
        for j in todo:
            start, end = j * shard_size, min((j + 1) * shard_size, n)
            window = samples[start:end]
            results: list[CachedSample | None] = [None] * len(window)
            for batch in length_batches([len(s[0]) for s in window], batch_size=batch_size, batch_tokens=batch_tokens):
                seqs = [window[i][0] for i in batch]
                pos = [trained_positions(np.asarray(window[i][1])) for i in batch]
                if sum(len(p) for p in pos):
                    ids, lps = scorer.topk(seqs, pos, vocab, top_k, temperature)
                    ids, lps = ids.cpu(), lps.cpu()
                else:  # nothing to score in this batch (all prompts, or cut by --max-length)
                    ids, lps = torch.zeros((0, top_k), dtype=torch.int64), torch.zeros((0, top_k))
                a = 0
                for b, i in enumerate(batch):
                    r = len(pos[b])
                    results[i] = CachedSample(
                        np.asarray(window[i][0]), np.asarray(window[i][1], dtype=np.uint8), ids[a:a + r], lps[a:a + r]
                    )
                    a += r
                ntok = sum(len(s) for s in seqs)
                tokens_done += ntok
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{tokens_done / max(time.perf_counter() - t0, 1e-9):.0f}")
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write_shard, j, start, results)
            if delay:
                pending.result()
                time.sleep(delay)
        if pending is not None:
            pending.result()
    finally:
        pool.shutdown(wait=True)
        bar.close()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    final = writer.finish({
        "seconds": round(elapsed, 3), "cpu_seconds": round(cpu, 3),
        "tokens_per_second": round(tokens_done / max(elapsed, 1e-9), 1),
    })
    say(
        f"cached {n} sequences, {final.num_tokens} tokens ({final.num_rows} trained positions) in {out}: "
        f"{final.total_bytes / max(final.num_tokens, 1):.1f} bytes/token, mean tail mass {final.mean_tail_mass:.4f}"
    )
    return final
