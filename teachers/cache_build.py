"""Run a teacher over a data set and write its next-token distributions to a cache (the runner).

What is stored per trained position is the codec's business (`distill.cache.codecs`, `--codec`, default
"topk": the k most likely ids and their log-probs).

Order of work, so that mistakes cost seconds, not hours: check arguments and the output directory, load
and tokenize the data, load the tokenizer (k vs vocabulary), then the model, then open the writer (which
refuses a cache made with something else), then stream shards.

The teacher is a backend (`teachers.backends`, `--backend`, default "hf"): this runner never touches the
model, it asks the backend for the top-k of each trained position (`score`), or, for a codec that needs
the whole distribution (sampling), hands the codec's `reduce` to the backend (`score_rows`); it records
the backend's identity and build information in the manifest.

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

from distill.cache.codecs import DEFAULT_CODEC, codec_from_options, get_codec
from distill.cache.codecs.sampling import row_seeds
from distill.cache.format import Manifest, id_dtype_for, tokenizer_fingerprint
from distill.cache.writer import CachedSample, CacheWriter, check_output_dir, trained_positions
from distill.data.records import encode_record, load_records
from distill.errors import DistillError

# Test hook: seconds to sleep after each committed shard, so a test can SIGKILL a build mid-way.
_SHARD_DELAY_ENV = "DISTILL_TEST_SHARD_DELAY"


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


def _score(backend, coder, seqs, positions, sample_indices, temperature: float) -> dict[str, torch.Tensor]:
    """Teacher rows of one batch for the codec: the backend's top-k, or the codec's reduction of full rows."""
    if not coder.needs_full_rows:
        ids, lps = backend.score(seqs, positions, k=coder.k, temperature=temperature)
        return {"ids": ids, "logprobs": lps}
    if not hasattr(backend, "score_rows"):
        raise DistillError(f"--codec {coder.name} needs the teacher's whole distribution, which --backend {backend.name} "
                           "does not give (no score_rows); use --codec topk or another backend")
    # Draws are keyed by (codec seed, sample index, position): the bytes do not depend on batching.
    seeds = np.concatenate([row_seeds(coder.seed, i, p) for i, p in zip(sample_indices, positions)])
    return backend.score_rows(seqs, positions, temperature=temperature,
                              reduce=lambda x, row: coder.reduce(x, seeds[row:row + x.shape[0]]))


def _data_fingerprint(samples: Sequence[tuple[list[int], list[int]]]) -> str:
    h = hashlib.sha256()
    for ids, mask in samples:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(mask, dtype=np.uint8).tobytes())
        h.update(b"#")
    return "sha256:" + h.hexdigest()


def build_cache(
    teacher: str,
    data: str | Path | None,
    out: str | Path,
    *,
    top_k: int | None = None,
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
    backend: str = "hf",
    codec: str = DEFAULT_CODEC,
    samples: int | None = None,
    proposal_temperature: float = 1.0,
    seed: int = 0,
    pack_ids: bool = False,
) -> Manifest:
    """Build (or resume) a teacher cache in `out` and return its final manifest.

    `data` is a path / hub id read by `load_records`; `records` (already normalised dicts) replaces it when
    the pipeline has them in memory. `backend` names the teacher backend (`teachers.backends.BACKENDS`),
    `codec` the cache codec (`distill.cache.codecs.CODECS`); `top_k`, `dtype`, `samples`,
    `proposal_temperature`, `seed` and `pack_ids` are codec options (each codec refuses those it does not use).
    Raises DistillError for every user mistake, before any output is written.
    """
    from teachers.backends import check_backend, get_backend

    say = log or (lambda msg: print(msg, file=sys.stderr))
    codec_params = codec_from_options(codec, top_k=top_k, value_dtype=dtype, samples=samples,
                                      proposal_temperature=proposal_temperature, seed=seed, pack_ids=pack_ids)
    if not temperature > 0:
        raise DistillError(f"--temperature must be positive, got {temperature}")
    if max_length < 2:
        raise DistillError(f"--max-length must be at least 2, got {max_length}")
    if batch_size < 1 or shard_size < 1 or (batch_tokens is not None and batch_tokens < 1):
        raise DistillError("--batch-size, --batch-tokens and --shard-size must be positive")
    check_backend(backend)
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

    teacher_backend = get_backend(backend, teacher, device=device, quant=quant, dtype=teacher_dtype,
                                  trust_remote_code=trust_remote_code, revision=revision)
    tok = teacher_backend.tokenizer
    vocab = teacher_backend.vocab_size
    coder = get_codec(codec, codec_params, vocab_size=vocab, id_dtype=id_dtype_for(vocab))
    if coder.k and coder.k >= vocab:
        # At k = vocabulary there is no tail: every token is stored, and the rounding of the stored values
        # leaves a spurious tail mass that no student can match.
        raise DistillError(f"--top-k {coder.k} must be smaller than the teacher's vocabulary ({vocab} tokens); use a smaller k")

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

    teacher_backend.load()
    width = teacher_backend.logits_width
    if width < vocab:
        raise DistillError(f"teacher logits width {width} is smaller than its tokenizer ({vocab} tokens); the tokenizer does not belong to this model")

    manifest = Manifest(
        teacher=teacher_backend.identity,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        tokenizer_length=vocab,
        logits_width=width,
        pad_id=int(tok.pad_token_id),
        k=coder.k,
        temperature=float(temperature),
        value_dtype=coder.value_dtype,
        id_dtype=coder.id_dtype,
        num_samples=n,
        data={
            "source": str(data) if data is not None else "records",
            "fingerprint": _data_fingerprint(samples),
            "max_length": int(max_length),
            "shard_size": int(shard_size),
        },
        codec=codec,
        codec_params=coder.params,
        build={
            "truncated_samples": truncated, "truncated_tokens": dropped_tokens,
            "samples_without_trained_tokens": no_trained, **teacher_backend.build_info,
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
                    rows = _score(teacher_backend, coder, seqs, pos, [start + i for i in batch], temperature)
                else:  # nothing to score in this batch (all prompts, or cut by --max-length)
                    rows = coder.empty_rows()
                a = 0
                for b, i in enumerate(batch):
                    r = len(pos[b])
                    part = {key: t[a:a + r] for key, t in rows.items()}
                    results[i] = CachedSample(
                        np.asarray(window[i][0]), np.asarray(window[i][1], dtype=np.uint8), part.pop("ids"),
                        part.pop("logprobs"), part,
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
