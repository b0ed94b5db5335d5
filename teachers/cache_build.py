"""Run a teacher over a data set and write its next-token distributions to a cache (the runner).

What is stored per trained position is the codec's business (`distill.cache.codecs`, `--codec`, default
"topk": the k most likely ids and their log-probs). The options are `CacheBuildConfig`
(teachers/cache_settings.py), declared once for the CLI, the run config and `build_cache`.

`build_cache` reads top to bottom in three steps:

  prepare_build  check arguments and the output directory, load and tokenize the data, load the
                 tokenizer (k vs vocabulary), then the model, then open the writer (which refuses a
                 cache made with something else). Mistakes cost seconds, not hours.
  run_shards     score this process's shards, batch by batch, and commit each one.
  finish_build   wait for every process, then list the shards in the manifest and mark it complete.

The teacher is a backend (`teachers.backends`, `--backend`, default "hf"): this runner never touches the
model, it asks the backend for the top-k of each trained position (`score`), which the codec stores, and records the backend's
identity and build information in the manifest.

Shard j always holds samples [j*shard_size, (j+1)*shard_size) in data order; inside a shard, samples are
batched by length (little padding). Batching is a pure function of the shard's samples and the options,
so a resumed build computes exactly what an uninterrupted one would have, and the shard's content does
not depend on which process computed it. Under `accelerate launch --multi_gpu --num_processes N` the shards still to
do are dealt out round robin (`distill.ranks`): N processes build the cache a one-process build makes.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from distill.cache.codecs import Codec, codec_from_options, get_codec
from distill.cache.codecs.sampling import row_seeds
from distill.cache.format import Manifest, data_fingerprint, id_dtype_for, tokenizer_fingerprint
from distill.cache.writer import CachedSample, CacheWriter, check_output_dir, trained_positions
from distill.data.records import encode_record, load_records
from distill.errors import DistillError
from distill.models.devices import device_map_memory
from distill.options import validate
from distill.ranks import Ranks, current_ranks
from teachers.cache_settings import DEVICE_MAP_CHOICES, VALUE_DTYPE_CHOICES, CacheBuildConfig  # noqa: F401 (re-exported)
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


@dataclass
class BuildJob:
    """What the shard loop needs, made by `prepare_build`: the samples, the teacher, the writer, the options."""

    out: Path
    samples: list[tuple[list[int], list[int]]]
    backend: Any  # a teachers.backends.TeacherBackend, loaded
    writer: CacheWriter
    ranks: Ranks
    coder: Codec  # what is stored per trained position
    temperature: float
    batch_size: int
    batch_tokens: int | None
    shard_size: int
    say: Callable[[str], None]
    todo: list[int] = field(default_factory=list)  # this process's shard indices, in order


@dataclass
class LoopStats:
    """One process's figures from `run_shards` (summed over processes by `finish_build`)."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0
    tokens: int = 0
    shards: int = 0


def build_cache(
    teacher: str,
    data: str | Path | None,
    out: str | Path,
    *,
    records: Sequence[Mapping[str, Any]] | None = None,
    ranks: Ranks | None = None,
    log=None,
    **settings,
) -> Manifest:
    """Build (or resume) a teacher cache in `out` and return its final manifest.

    `settings` are the other `CacheBuildConfig` fields (top_k, temperature, codec, device_map, ...):
    their defaults and checks live there, once for the CLI, the run config and this call.
    `data` is a path / hub id read by `load_records`; `records` (already normalised dicts) replaces it when
    the pipeline has them in memory. `ranks`: this process among several (default: what the launcher
    says, `distill.ranks`); every process calls build_cache with the same arguments and gets the same
    manifest back. Raises DistillError for every user mistake, before any output is written.
    """
    cfg = validate(CacheBuildConfig(teacher=str(teacher), data=None if data is None else str(data), out=Path(out),
                                    **settings))
    job = prepare_build(cfg, records=records, ranks=ranks, log=log)
    if job.writer.manifest.complete:
        job.say(f"cache in {job.out} is already complete ({len(job.samples)} sequences); nothing to do")
        return job.writer.manifest
    stats = run_shards(job, progress=cfg.progress)
    return finish_build(job, stats)


# ------------------------------------------------------------------------------------------- prepare


def check_device_map(device_map: str | None) -> str | None:
    if device_map is not None and device_map not in DEVICE_MAP_CHOICES:
        raise DistillError(f"--device-map must be one of {', '.join(DEVICE_MAP_CHOICES)}, got {device_map!r}")
    return device_map


def _load_records(data, records, *, fields, split, data_config, limit, as_chat) -> list[dict]:
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
    return records


def _encode_samples(tok, records, max_length: int) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """(ids, mask) per record, cut to max_length, and the counts the manifest records about the cut."""
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
    return samples, {"truncated_samples": truncated, "truncated_tokens": dropped_tokens,
                     "samples_without_trained_tokens": no_trained}


def prepare_build(cfg: CacheBuildConfig, *, records=None, ranks: Ranks | None = None, log=None) -> BuildJob:
    """Everything before the first forward pass, cheapest checks first; returns the job for `run_shards`."""
    from teachers.backends import check_backend, get_backend

    codec_params = codec_from_options(cfg.codec, top_k=cfg.top_k, value_dtype=cfg.dtype, samples=cfg.samples,
                                      proposal_temperature=cfg.proposal_temperature, seed=cfg.seed, pack_ids=cfg.pack_ids)
    check_backend(cfg.backend)
    out = Path(cfg.out)
    ranks = ranks or current_ranks(cfg.device)
    ranks.on_main(lambda: check_output_dir(out))  # the main process alone reads `out` before it is set up
    records = _load_records(cfg.data, records, fields=cfg.fields, split=cfg.split, data_config=cfg.data_config,
                            limit=cfg.limit, as_chat=cfg.as_chat)
    say = (log or (lambda msg: print(msg, file=sys.stderr))) if ranks.is_main else (lambda msg: None)

    teacher_backend = get_backend(cfg.backend, cfg.teacher, device=cfg.device, quant=cfg.quant, dtype=cfg.teacher_dtype,
                                  trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                                  device_map=cfg.device_map,
                                  max_memory=device_map_memory(cfg.device_map, ranks.local_rank, ranks.local_world))
    tok = teacher_backend.tokenizer
    vocab = teacher_backend.vocab_size
    coder = get_codec(cfg.codec, codec_params, vocab_size=vocab, id_dtype=id_dtype_for(vocab))
    if coder.k and coder.k >= vocab:
        # At k = vocabulary there is no tail: every token is stored, and the rounding of the stored values
        # leaves a spurious tail mass that no student can match.
        raise DistillError(f"--top-k {coder.k} must be smaller than the teacher's vocabulary ({vocab} tokens); use a smaller k")
    max_length, shard_size = cfg.max_length, cfg.shard_size
    samples, cut = _encode_samples(tok, records, max_length)
    n = len(samples)
    if n and cut["samples_without_trained_tokens"] == n:
        # A cache of prompts only trains nothing: the student's loss would be 0 at every step.
        longest = max(len(encode_record(tok, rec)[0]) for rec in records)
        raise DistillError(f"none of the {n} sequences keeps a completion token within --max-length {max_length} "
                           f"(the longest is {longest} tokens); raise --max-length or shorten the prompts")

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
        temperature=float(cfg.temperature),
        value_dtype=coder.value_dtype,
        id_dtype=coder.id_dtype,
        num_samples=n,
        data={
            "source": str(cfg.data) if cfg.data is not None else "records",
            "fingerprint": data_fingerprint(samples),
            "max_length": int(max_length),
            "shard_size": int(shard_size),
        },
        codec=cfg.codec,
        codec_params=coder.params,
        build={**cut, **teacher_backend.build_info},
    )
    writer = CacheWriter(out, manifest, ranks=ranks)
    job = BuildJob(out=out, samples=samples, backend=teacher_backend, writer=writer, ranks=ranks, coder=coder,
                   temperature=float(cfg.temperature), batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens,
                   shard_size=shard_size, say=say)
    if writer.manifest.complete:
        return job
    if cut["truncated_samples"]:
        say(f"truncated {cut['truncated_samples']} of {n} sequences to --max-length {max_length} "
            f"({cut['truncated_tokens']} tokens dropped)")
    if cut["samples_without_trained_tokens"]:
        say(f"warning: {cut['samples_without_trained_tokens']} sequences have no trained tokens "
            "(empty completion or cut by --max-length)")
    done = writer.done_indices()
    num_shards = (n + shard_size - 1) // shard_size
    job.todo = ranks.take([j for j in range(num_shards) if j not in done])
    if done:
        say(f"resuming: {len(done)} of {num_shards} shards already in {out}")
    if ranks.distributed:
        say(f"{ranks.world} processes share the {num_shards - len(done)} shards still to do")
    return job


# ---------------------------------------------------------------------------------------------- loop


def score_shard(job: BuildJob, window: Sequence[tuple[list[int], list[int]]], start: int,
                on_batch=None) -> list[CachedSample]:
    """The codec's rows for every trained position of the samples of one shard (samples start..)."""
    results: list[CachedSample | None] = [None] * len(window)
    for batch in length_batches([len(s[0]) for s in window], batch_size=job.batch_size, batch_tokens=job.batch_tokens):
        seqs = [window[i][0] for i in batch]
        pos = [trained_positions(np.asarray(window[i][1])) for i in batch]
        if sum(len(p) for p in pos):
            rows = _score(job, seqs, pos, [start + i for i in batch])
        else:  # nothing to score in this batch (all prompts, or cut by --max-length)
            rows = job.coder.empty_rows()
        a = 0
        for b, i in enumerate(batch):
            r = len(pos[b])
            part = {key: t[a:a + r] for key, t in rows.items()}
            results[i] = CachedSample(np.asarray(window[i][0]), np.asarray(window[i][1], dtype=np.uint8),
                                      part.pop("ids"), part.pop("logprobs"), part)
            a += r
        if on_batch is not None:
            on_batch(len(batch), sum(len(s) for s in seqs))
    return results  # type: ignore[return-value]


def _score(job: BuildJob, seqs, positions, sample_indices) -> dict[str, torch.Tensor]:
    """Teacher rows of one batch for the codec: the backend's top-k, or the codec's reduction of full rows."""
    coder, backend = job.coder, job.backend
    if not coder.needs_full_rows:
        ids, lps = backend.score(seqs, positions, k=coder.k, temperature=job.temperature)
        return {"ids": ids, "logprobs": lps}
    if not hasattr(backend, "score_rows"):
        raise DistillError(f"--codec {coder.name} needs the teacher's whole distribution, which --backend {backend.name} "
                           "does not give (no score_rows); use --codec topk or another backend")
    # Draws are keyed by (codec seed, sample index, position): the bytes do not depend on batching or processes.
    seeds = np.concatenate([row_seeds(coder.seed, i, p) for i, p in zip(sample_indices, positions)])
    return backend.score_rows(seqs, positions, temperature=job.temperature,
                              reduce=lambda x, row: coder.reduce(x, seeds[row:row + x.shape[0]]))


def run_shards(job: BuildJob, *, progress: bool = True) -> LoopStats:
    """Score and commit this process's shards; the write of one overlaps the scoring of the next."""
    from tqdm.auto import tqdm

    n, size = len(job.samples), job.shard_size
    remaining = sum(min(size, n - j * size) for j in job.todo)
    delay = float(os.environ.get(_SHARD_DELAY_ENV, "0") or 0)
    desc = "cache" if not job.ranks.distributed else f"cache (rank 0 of {job.ranks.world})"
    bar = tqdm(total=remaining, unit="seq", desc=desc, file=sys.stderr, dynamic_ncols=True,
               disable=not progress or not job.ranks.is_main)
    stats = LoopStats()
    t0, c0 = time.perf_counter(), time.process_time()

    def on_batch(sequences: int, tokens: int) -> None:
        stats.tokens += tokens
        bar.update(sequences)
        bar.set_postfix(tok_s=f"{stats.tokens / max(time.perf_counter() - t0, 1e-9):.0f}")

    pool = ThreadPoolExecutor(max_workers=1)
    pending: Future | None = None
    try:
        for j in job.todo:
            start = j * size
            results = score_shard(job, job.samples[start:min(start + size, n)], start, on_batch)
            if pending is not None:
                pending.result()
            pending = pool.submit(job.writer.write_shard, j, start, results)
            stats.shards += 1
            if delay:
                pending.result()
                time.sleep(delay)
        if pending is not None:
            pending.result()
    finally:
        pool.shutdown(wait=True)
        bar.close()
    stats.seconds, stats.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return stats


# -------------------------------------------------------------------------------------------- finish


def finish_build(job: BuildJob, stats: LoopStats) -> Manifest:
    """Wait for every process, then record the build's figures and mark the cache complete (collective)."""
    everyone = job.ranks.gather(stats)
    seconds = max(s.seconds for s in everyone)
    tokens = sum(s.tokens for s in everyone)
    final = job.writer.finish({
        "seconds": round(seconds, 3), "cpu_seconds": round(sum(s.cpu_seconds for s in everyone), 3),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1), "processes": job.ranks.world,
    })
    job.say(
        f"cached {final.num_samples} sequences, {final.num_tokens} tokens ({final.num_rows} trained positions) "
        f"in {job.out}: {final.total_bytes / max(final.num_tokens, 1):.1f} bytes/token, "
        f"mean tail mass {final.mean_tail_mass:.4f}"
    )
    return final
