"""Sample reasoning traces from a teacher into a resumable JSONL file.

This module owns the traces file: which problems, which (problem, sample) rows are still to do, the
settings and teacher recorded with every trace, and resuming after a kill. The teacher runs behind a
backend (`teachers.backends`, `--backend`, default "hf"); prompts and row seeds come from
`distill.models.sampling`. A resumed file holds exactly what an uninterrupted run writes because every row is seeded by
(seed, prompt, sample index) and rows are generated in fixed chunks of the full row list, each decoded
the same way whenever it runs (continuous batching inside a chunk; a partly written chunk is redone
whole). For the same reason N processes (`accelerate launch`) that share the chunks write the file one
process writes.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from distill.data.problems import FIELD_NAMES, load_problems
from distill.models.quant import QUANT_CHOICES
from distill.errors import DistillError
from distill.models.sampling import DEFAULT_SYSTEM_PROMPT, GenerationStats, format_prompt, row_seed
from distill.options import option, validate
from distill.ranks import Ranks, current_ranks
from teachers.cache_settings import DEVICE_MAP_CHOICES
from teachers.verify import is_correct

# 2: one uniform per row and step, inverse CDF over the top-p nucleus (1: Gumbel noise over the vocabulary)
TRACE_FORMAT_VERSION = 2
# Rows per resumable chunk, in decode batches: large enough that the batch rarely drains.
CHUNK_BATCHES = 8
# STaR's rationalization hint (Zelikman et al. 2022), appended to the question of a problem that sampling
# got wrong. Only the generation prompt carries it: the stored trace keeps the plain question, so the
# student learns to reach the answer without being told it.
HINT_TEMPLATE = "{question}\n\n(Hint: the correct final answer is {answer}. Reason step by step to reach it.)"


@dataclass
class GenerateConfig:
    """`distill teacher generate` and the `[generate]` section of a run config (declared once)."""

    teacher: str = option(help="Teacher: model directory, hub id, or a .gguf file.")
    data: str = option(help="Problems: synthetic[:N[:SEED[:MIN-MAX]]], gsm8k[:SPLIT] (hub), a JSONL file "
                            "(question/answer), or a folder with {split}.jsonl.")
    out: Path = option(help="Traces JSONL; appended to and resumed if it exists.")
    samples: int = option(1, "Traces per problem.", minimum=1, short="-n")
    temperature: float = option(0.7, "Sampling temperature; 0 = greedy.", minimum=0)
    top_p: float = option(0.95, "Nucleus sampling mass.", exclusive_minimum=0, maximum=1)
    max_new_tokens: int = option(512, "Longest completion in tokens.", minimum=1)
    system_prompt: str | None = option(None, "System prompt (default: asks for <think>...</think>, then the answer; "
                                             "'' for none).")
    limit: int | None = option(None, "Use only the first N problems.", minimum=1)
    batch_size: int | None = option(None, "Rows decoded together (default: as many as --batch-tokens hold).",
                                    minimum=1)
    batch_tokens: int | None = option(None, "KV-cache positions (prompt + completion, over the rows) decoded "
                                            "together when --batch-size is not given (default 32768).", minimum=1)
    seed: int = option(0, "Sampling seed (each trace is seeded by seed, prompt, sample).")
    fields: dict[str, str] | None = option(None, "Map a column: FIELD=COLUMN (repeatable).", choices=FIELD_NAMES,
                                           flag="--field", metavar="FIELD=COLUMN")
    split: str = option("train", "Split read from a data folder or the hub (traces are training data).")
    device: str | None = option(None, "cpu or cuda (default: cuda when available).")
    quant: str = option("none", "Load the teacher as none, nf4 or int8.", choices=QUANT_CHOICES, flag="--teacher-quant")
    device_map: str | None = option(None, "auto: spread a teacher too big for one GPU over this machine's GPUs, then "
                                          "the CPU (docs/scale-out.md).", choices=DEVICE_MAP_CHOICES)
    trust_remote_code: bool = option(False, "Run the model repo's own code.")
    backend: str = option("hf", "Teacher backend that runs the model (hf: Hugging Face transformers).")
    progress: bool = option(True, "Show a progress bar with tokens/s.")
    rationalize: int = option(0, "STaR rationalization: for each problem that no sample answered right, this many "
                                 "more samples with the gold answer given as a hint; the filter keeps the ones that "
                                 "reach it, stored without the hint (0: off).", minimum=0)


# ----------------------------------------------------------------------------- traces file


def read_traces(path: str | Path, *, repair: bool = False) -> list[dict]:
    """Trace records of a JSONL file; bytes after the last newline (a kill mid-write) are ignored.

    Every record is written as one `json + newline` write, so only the tail can be partial. With
    `repair=True` the file itself is cut back to its last newline so that appends stay valid.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    records = []
    for lineno, line in enumerate(raw[:good_end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DistillError(f"{path}:{lineno}: corrupt trace line; delete the file or fix the line") from None
    if repair and good_end < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return records


def _settings_key(settings: dict) -> dict:
    return {k: settings.get(k) for k in ("temperature", "top_p", "max_new_tokens", "system_prompt", "seed",
                                          "format_version")}


def part_path(out: Path, rank: int) -> Path:
    """Where process `rank` of a multi-process run appends its traces until the main process folds them in."""
    return out.with_name(f"{out.name}.part-r{rank:02d}")


def fold_parts(out: Path, order: dict[tuple[str, int], int]) -> int:
    """Append the traces of every part file to `out` in canonical row order, then delete the parts.

    `order` maps (prompt id, sample) to its row's place in the full row list; rows it does not know go
    last, in the order found. Rows already in `out` are not written twice, so folding again after a
    kill between the append and the deletes is harmless. Returns the number of traces appended.
    """
    parts = sorted(out.parent.glob(f"{glob.escape(out.name)}.part-r*"))
    if not parts:
        return 0
    have = {(r.get("prompt_id"), int(r.get("sample", -1))) for r in read_traces(out, repair=True)}
    new: dict[tuple[str, int], dict] = {}
    for part in parts:
        for rec in read_traces(part):
            key = (rec.get("prompt_id"), int(rec.get("sample", -1)))
            if key not in have:
                new.setdefault(key, rec)
    rank_of = {key: (order.get(key, len(order)), i) for i, key in enumerate(new)}
    if new:
        with open(out, "a", encoding="utf-8") as fh:
            for key in sorted(new, key=rank_of.__getitem__):
                fh.write(json.dumps(new[key], ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    for part in parts:
        part.unlink(missing_ok=True)
    return len(new)


def generate_traces(*, ranks: Ranks | None = None, verify=None, **settings) -> dict:
    """Write `samples` traces per problem to `out` (JSONL, appended and flushed per batch).

    `settings` are the `GenerateConfig` fields (teacher, data, out, samples, ...): their defaults and
    checks live there, once for the CLI, the run config and this call.

    Resumable: finished (prompt id, sample) pairs already in `out` are skipped; a truncated last line is
    cut off; traces made with other settings or another teacher are refused. Rows are grouped in fixed
    chunks of the full (problem, sample) list, each trace is written as soon as its row ends (in row
    order), and a partly written chunk is regenerated whole, so a resumed file holds exactly what an
    uninterrupted run writes. `batch_size` rows (default: as many as `batch_tokens` KV-cache positions
    hold, see `distill.models.sampling.decode_capacity`) decode together. Returns a summary dict.

    Several processes (`accelerate launch`, `ranks`) deal the chunks still to do round robin; each
    appends to its own part file and, when all are done, the main process appends the parts to `out`
    in row order: the file equals a one-process run's (rows are seeded one by one). A killed run's
    parts are folded in first when it is rerun, with any number of processes.

    `backend` is a registered backend name (`teachers.backends.BACKENDS`, loaded for `teacher` with
    `device`, `quant`, `device_map` and `trust_remote_code`) or a ready backend object. Its identity
    (backend name included) is recorded with every trace.

    STaR rationalization (`rationalize` > 0): once every sample is written, each problem none of whose
    samples `verify(completion, gold)` accepts (default: the accuracy reward, `teachers.verify.is_correct`) gets
    `rationalize` more rows prompted with the gold answer as a hint (`HINT_TEMPLATE`). They are
    recorded with `rationalized: true`, sample indices from `samples` on, and the plain question: the
    filter keeps those that reach the answer, and the cache never sees the hint.
    """
    from distill.data.gsm8k import gold_answer
    from teachers.backends import check_backend, get_backend

    backend = settings.get("backend")
    if backend is not None and not isinstance(backend, str):  # a ready backend object: record its name
        settings = {**settings, "backend": getattr(backend, "name", type(backend).__name__)}
    cfg = validate(GenerateConfig(**settings))
    if backend is None or isinstance(backend, str):
        backend = check_backend(cfg.backend)
    samples, temperature, top_p, max_new_tokens, batch_size, seed = (
        cfg.samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size, cfg.seed)
    system_prompt = DEFAULT_SYSTEM_PROMPT if cfg.system_prompt is None else cfg.system_prompt
    problems = load_problems(cfg.data, fields=cfg.fields, limit=cfg.limit, split=cfg.split)
    out = Path(cfg.out)
    if out.exists() and out.is_dir():
        raise DistillError(f"--out {out} is a directory; give a .jsonl file path")
    ranks = ranks or current_ranks(cfg.device)
    rows = [(p, smp) for p in problems for smp in range(samples)]
    order = {(p["id"], smp): i for i, (p, smp) in enumerate(rows)}
    order.update({(p["id"], samples + j): len(rows) + i * cfg.rationalize + j  # STaR rows follow, in problem order
                  for i, p in enumerate(problems) for j in range(cfg.rationalize)})
    ranks.on_main(lambda: fold_parts(out, order))  # what a killed multi-process run left
    existing = read_traces(out)  # validate before loading a (possibly large) teacher
    settings = {"temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": int(max_new_tokens),
                "system_prompt": system_prompt, "seed": int(seed), "format_version": TRACE_FORMAT_VERSION}
    for rec in existing:
        if _settings_key(rec.get("settings", {})) != _settings_key(settings):
            raise DistillError(f"{out} holds traces made with other settings ({_diff(rec.get('settings', {}), settings)});"
                               " use another --out or the same settings")

    if isinstance(backend, str):
        from distill.models.devices import device_map_memory

        backend = get_backend(backend, cfg.teacher, device=cfg.device, quant=cfg.quant,
                              trust_remote_code=cfg.trust_remote_code, device_map=cfg.device_map,
                              max_memory=device_map_memory(cfg.device_map, ranks.local_rank, ranks.local_world))
    tokenizer, identity = backend.tokenizer, backend.identity

    questions = {p["id"]: p["question"] for p in problems}
    done: set[tuple[str, int]] = set()
    for rec in existing:
        old = rec.get("teacher", {})
        # traces written before backends were recorded came from the Hugging Face one
        if (any(old.get(k) != identity.get(k) for k in ("name_or_path", "config_hash", "weights_probe"))
                or old.get("backend", "hf") != identity.get("backend")):
            raise DistillError(f"{out} holds traces of another teacher ({old.get('name_or_path')}, backend "
                               f"{old.get('backend', 'hf')}); use another --out")
        pid = rec.get("prompt_id")
        if pid in questions and rec.get("question") != questions[pid]:
            raise DistillError(f"{out} holds traces for problem {pid} with a different question; "
                               "the data changed: use another --out")
        done.add((pid, int(rec.get("sample", -1))))
    if existing and ranks.is_main:
        read_traces(out, repair=True)

    # A row is (problem, sample index, hinted). Sampled rows first; STaR rationalization rows (hinted) follow
    # for the problems that no sample solved, with sample indices from `samples` on.
    prompts = {p["id"]: format_prompt(tokenizer, p["question"], system_prompt) for p in problems}
    encoded = {pid: tokenizer(text, add_special_tokens=False)["input_ids"] for pid, text in prompts.items()}
    for rec in existing:
        if rec.get("rationalized") and int(rec.get("sample", -1)) < samples:
            raise DistillError(f"{out} holds rationalized traces at sample indices that --samples {samples} now covers; "
                               "use another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    sink = out if not ranks.distributed else part_path(out, ranks.rank)
    stats = GenerationStats()
    phase = dict(backend=backend, done=done, ranks=ranks, sink=sink, stats=stats, settings=settings, identity=identity,
                 temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                 batch_tokens=cfg.batch_tokens, seed=seed, progress=cfg.progress)
    pending_rows = sum(1 for p, s in rows if (p["id"], s) not in done)
    sampled_rows = [(p, s, False) for p, s in rows]
    written, capacity = _generate_rows(sampled_rows, prompts, encoded, desc="generate", **phase)
    rationalized_problems = 0
    if cfg.rationalize:
        if ranks.distributed:  # every process must see every sampled trace to agree on the failures
            ranks.barrier()
            ranks.on_main(lambda: fold_parts(out, order))
            ranks.barrier()
        check = verify or is_correct
        solved = {(r.get("prompt_id")) for r in read_traces(out)
                  if not r.get("rationalized") and int(r.get("sample", -1)) < samples and check(r["completion"], r.get("gold"))}
        failed = [p for p in problems if p["id"] not in solved]
        rationalized_problems = len(failed)
        hinted = {p["id"]: format_prompt(tokenizer, HINT_TEMPLATE.format(question=p["question"], answer=gold_answer(p["answer"])),
                                         system_prompt) for p in failed}
        hinted_ids = {pid: tokenizer(text, add_special_tokens=False)["input_ids"] for pid, text in hinted.items()}
        hint_rows = [(p, samples + j, True) for p in failed for j in range(cfg.rationalize)]
        written += _generate_rows(hint_rows, hinted, hinted_ids, desc="rationalize", **phase)[0]
    if ranks.distributed:
        ranks.barrier()  # every part is complete before the main process folds them
        ranks.on_main(lambda: fold_parts(out, order))
        everyone = ranks.gather((written, stats))
        written = sum(w for w, _ in everyone)
        stats = GenerationStats(new_tokens=sum(st.new_tokens for _, st in everyone),
                                completions=sum(st.completions for _, st in everyone),
                                seconds=max(st.seconds for _, st in everyone))
    stats.prompts = len(problems)
    return {"out": str(out), "problems": len(problems), "samples": samples, "written": written,
            "skipped": len(rows) - pending_rows, "processes": ranks.world, "stats": stats.as_dict(),
            "rationalized_problems": rationalized_problems, "batch_size": capacity}


def _generate_rows(rows: list[tuple[dict, int, bool]], prompts: dict[str, str], encoded: dict[str, list[int]], *,
                   backend, done: set, ranks: Ranks, sink: Path, stats: GenerationStats, settings: dict, identity: dict,
                   temperature: float, top_p: float, max_new_tokens: int, batch_size: int | None,
                   batch_tokens: int | None, seed: int, progress: bool, desc: str) -> tuple[int, int]:
    """Generate the rows not in `done`, in fixed chunks of `rows` shared among the processes, appending
    one record per row to `sink` in row order as rows end; returns (rows written, rows decoded together).
    A hinted row is seeded by its hinted prompt and stored with the plain question (and `rationalized: true`)."""
    from distill.data.gsm8k import gold_answer
    from distill.models.sampling import decode_capacity

    if not rows:
        return 0, 0
    capacity = decode_capacity([len(encoded[p["id"]]) for p, _, _ in rows], max_new_tokens, batch_size=batch_size,
                               batch_tokens=batch_tokens)
    size = capacity * CHUNK_BATCHES
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    todo = [c for c in chunks if any((p["id"], s) not in done for p, s, _ in c)]
    pending = sum(1 for c in todo for p, s, _ in c if (p["id"], s) not in done)
    mine = ranks.take(todo)
    bar = None
    if progress and ranks.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), initial=len(rows) - pending, desc=desc, unit="trace", file=sys.stderr,
                   dynamic_ncols=True)
    live = _LiveRate(bar, stats)
    written = 0
    with open(sink, "a", encoding="utf-8") as fh:
        for chunk in mine:
            ended: dict[int, object] = {}
            cursor = [0]  # the next row of the chunk to write

            def write(i: int, comp, chunk=chunk, ended=ended, cursor=cursor) -> None:
                """Rows end in any order; a trace is written, in row order, once every row before it ended."""
                nonlocal written
                ended[i] = comp
                stats.new_tokens += comp.num_tokens
                stats.completions += 1
                while cursor[0] in ended:
                    comp = ended.pop(cursor[0])
                    p, s, hinted = chunk[cursor[0]]
                    cursor[0] += 1
                    if (p["id"], s) in done:
                        continue
                    record = {
                        "prompt_id": p["id"], "sample": s, "question": p["question"],
                        "gold": gold_answer(p["answer"]), "reference": p["answer"],
                        "completion": comp.text, "num_tokens": comp.num_tokens,
                        "prompt_tokens": len(encoded[p["id"]]), "finished": comp.finished,
                        "mean_logprob": round(comp.mean_logprob, 6), "settings": settings, "teacher": identity,
                    }
                    if hinted:
                        record["rationalized"] = True
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")  # one write per line: a kill cuts only the tail
                    fh.flush()
                    written += 1
                    if bar is not None:
                        bar.update(1)

            live.start_batch()
            t0 = time.perf_counter()
            backend.generate([encoded[p["id"]] for p, _, _ in chunk],
                             [row_seed(seed, prompts[p["id"]], s) for p, s, _ in chunk],
                             temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             batch_size=capacity, on_step=live.step if bar is not None else None, on_row=write)
            stats.seconds += time.perf_counter() - t0
            fh.flush()
            os.fsync(fh.fileno())
            if bar is not None:
                bar.set_postfix_str(f"{stats.tokens_per_s:.1f} tok/s")
    if bar is not None:
        bar.close()
    return written, capacity


class _LiveRate:
    """Refreshes the progress bar's tok/s about once a second while a long chunk runs."""

    def __init__(self, bar, stats: GenerationStats):
        self.bar, self.stats = bar, stats
        self.base_tokens, self.batch_tokens, self.batch_start, self.last = 0, 0, time.perf_counter(), 0.0

    def start_batch(self) -> None:
        self.base_tokens, self.batch_tokens, self.batch_start = self.stats.new_tokens, 0, time.perf_counter()

    def step(self, tokens: int) -> None:
        self.batch_tokens += tokens
        now = time.perf_counter()
        if self.bar is not None and now - self.last > 1.0:
            self.last = now
            seconds = self.stats.seconds + now - self.batch_start
            rate = (self.base_tokens + self.batch_tokens) / seconds if seconds > 0 else 0.0
            self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=True)


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in _settings_key(new) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in keys)[:200]
