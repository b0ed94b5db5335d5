"""`run_bench(...)`: the whole benchmark as one Python call (the CLI and the pipeline use it).

It reads top to bottom as three steps:
  prepare_bench  check every setting (`BenchConfig`), the models' names, the output folder and the
                 held-out cache, and load the problems and the scorer: a user mistake fails here,
                 before the first model loads;
  bench_model    for each model, in the order given: load it as deployed, generate one greedy
                 completion per problem and N sampled ones, measure agreement with the teacher on a
                 held-out cache and the cost columns, score the answers and apply the selection rules;
  finish_bench   write results.json, results.md, the plots and samples.jsonl.
"""

from __future__ import annotations

import gc
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from distill.bench import cost as cost_mod
from distill.bench.loading import QUANT_CHOICES
from distill.bench.report import terminal_summary, write_report
from distill.bench.selection import (
    SAMPLED_RULES,
    SCORED_RULES,
    Sample,
    accuracy_curves,
    canonical_rules,
    n_grid,
    normalise_answer,
)
from distill.bench.stats import accuracy_entry
from distill.data.problems import FIELD_NAMES
from distill.errors import DistillError
from distill.io import atomic_write_jsonl
from distill.options import option, validate

RESULTS_VERSION = 1
DEFAULT_RULES = "greedy,pass@n,majority,best-of-n,weighted-best-of-n"


def parse_model_specs(specs: Sequence[str] | Mapping[str, str]) -> list[tuple[str, str]]:
    """['teacher=PATH', ...] or {'teacher': PATH} -> [(name, path)], names unique and non-empty."""
    if isinstance(specs, Mapping):
        pairs = [(str(k), str(v)) for k, v in specs.items()]
    else:
        pairs = []
        for spec in specs:
            if isinstance(spec, (tuple, list)) and len(spec) == 2:
                pairs.append((str(spec[0]), str(spec[1])))
                continue
            name, sep, path = str(spec).partition("=")
            if not sep or not name.strip() or not path.strip():
                raise DistillError(f"malformed --model {spec!r}: use NAME=PATH, e.g. --model student=runs/s1/final")
            pairs.append((name.strip(), path.strip()))
    if not pairs:
        raise DistillError("no model to benchmark: pass at least one --model NAME=PATH")
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DistillError(f"--model name {dup[0]!r} is given twice; give every model its own name")
    return pairs


def _answer_of(text: str, extract) -> str | None:
    try:
        return extract(text)
    except Exception:  # noqa: BLE001 - a parser crash on odd text is "no answer", not a failed bench
        return None


def _environment() -> dict:
    import torch
    import transformers

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DistillError(f"--out {out} is a file; give a directory for the results")


@dataclass
class BenchConfig:
    """`distill bench` and the `[bench]` section of a run config (declared once: `distill.options`
    derives the CLI options and the config keys from these fields)."""

    models: list[str] = option(help="NAME=PATH of a model to benchmark (repeatable): a model directory, an adapter "
                                    "directory, or a .gguf file.", flag="--model", short="-m", metavar="NAME=PATH")
    out: Path = option(help="Directory for results.json, results.md, samples.jsonl and the PNG plots.", short="-o")
    task: str = option("synthetic", "Problems: synthetic[:N[:SEED[:MIN-MAX]]] (bench seed 90210 by default), "
                                     "gsm8k[:SPLIT], a JSONL file (question/answer), or a folder with {split}.jsonl.")
    split: str = option("test", "Split read from a task folder or the hub.")
    fields: dict[str, str] | None = option(None, "Map a task file's column: FIELD=COLUMN (repeatable).",
                                           choices=FIELD_NAMES, flag="--field", metavar="FIELD=COLUMN")
    limit: int | None = option(None, "Use the first N problems (synthetic: N problems, default 50).", minimum=1)
    samples: int = option(1, "Sampled completions per problem (N) for pass@N, maj@N, best-of-N.", minimum=1, short="-n")
    select: str = option(DEFAULT_RULES, "Comma-separated selection rules: greedy,pass@n,majority,best-of-n,weighted-best-of-n.")
    scorer: str = option("self", "'self' (the model's own mean token log-prob) or a reward model directory "
                                 "(sequence classification).")
    held_out_cache: Path | None = option(None, "Teacher cache to measure KL, top-1 agreement and ECE against.")
    held_out_limit: int | None = option(None, "Use the first N samples of the held-out cache.", minimum=1)
    quant: str = option("auto", "auto (as saved; adapters on an NF4 base) | none | nf4 | int8.", choices=QUANT_CHOICES)
    temperature: float = option(0.7, "Sampling temperature of the N samples (greedy is always run separately).",
                                exclusive_minimum=0)
    top_p: float = option(0.95, "Nucleus sampling mass of the N samples.", exclusive_minimum=0, maximum=1)
    max_new_tokens: int = option(256, "Longest completion in tokens.", minimum=1)
    batch_size: int | None = option(None, "Rows decoded together (default: as many as --batch-tokens hold; tokens/s "
                                          "is measured batched).", minimum=1)
    batch_tokens: int | None = option(None, "KV-cache positions (prompt + completion, over the rows) decoded together "
                                            "when --batch-size is not given (default 32768).", minimum=1)
    time_budget: float | None = option(None, "Seconds the generation may take: the first model is calibrated and the "
                                             "problems cut to the first ones that fit (an estimate is printed either "
                                             "way).", exclusive_minimum=0)
    seed: int = option(0, "Sampling seed.")
    system_prompt: str | None = option(None, "Default: the prompt traces were generated with.")
    trust_remote_code: bool = option(False, "Allow model directories to run their own code.")
    progress: bool = option(True, "Show a progress bar per model.")

    def check(self, name) -> None:
        rules = canonical_rules(self.select)
        if self.samples == 1 and all(r in SAMPLED_RULES for r in rules):
            raise DistillError(f"{name('select')} {','.join(rules)} needs {name('samples')} N with N >= 2")

    def rules(self) -> list[str]:
        """The selection rules to apply: the sampled ones only when there are N >= 2 samples."""
        rules = canonical_rules(self.select)
        return [r for r in rules if r not in SAMPLED_RULES] if self.samples == 1 else rules


@dataclass
class BenchPlan:
    """Everything the model loop needs, checked and loaded before the first model loads."""

    cfg: BenchConfig
    pairs: list[tuple[str, str]]
    rules: list[str]
    sampled_rules: list[str]
    grid: list[int]
    problems: list
    task_info: dict
    system_prompt: str
    scorer: object | None
    started: float
    ranks: object  # distill.ranks.Ranks: this process among the launcher's
    estimate: dict | None = None  # the up-front time estimate, made on the first model


def run_bench(models: Sequence[str] | Mapping[str, str], *, print_summary: bool = False, ranks=None,
              **settings) -> dict:
    """Benchmark `models` on the task; write the report into `out`; return the results dict.

    `settings` are the other `BenchConfig` fields (out, task, samples, ...): their defaults and checks
    live there, once for the CLI, the run config and this call.

    Under `accelerate launch --num_processes N` (`ranks`, default: what the launcher says) every
    process loads each model and generates its share of the batches (dealt round robin, the batches of
    a one-process run); the main process gathers the completions, scores them, measures agreement and
    writes the report. Every process returns the results.
    """
    plan = prepare_bench(models, ranks=ranks, **settings)
    model_results, details = [], []
    for name, path in plan.pairs:
        result, rows = bench_model(plan, name, path)
        if result is not None:  # None on the processes that only generated
            model_results.append(result)
            details += rows
    return finish_bench(plan, model_results, details, print_summary=print_summary)


def prepare_bench(models: Sequence[str] | Mapping[str, str], *, ranks=None, **settings) -> BenchPlan:
    """Check every input and load the problems and the scorer: a user mistake fails here, in one
    line, before any model loads and before anything is written."""
    from distill.bench.scorers import make_scorer
    from distill.bench.tasks import load_task
    from distill.models.sampling import DEFAULT_SYSTEM_PROMPT
    from distill.ranks import current_ranks

    started = time.perf_counter()
    ranks = ranks or current_ranks()
    pairs = parse_model_specs(models)
    cfg = validate(BenchConfig(models=[f"{n}={p}" for n, p in pairs], **settings))
    rules = cfg.rules()
    _check_out(Path(cfg.out))
    if cfg.held_out_cache is not None:
        from distill.cache.format import read_manifest

        read_manifest(Path(cfg.held_out_cache))  # a missing / malformed cache fails before any model loads
    problems, task_info = load_task(cfg.task, limit=cfg.limit, split=cfg.split, fields=cfg.fields)
    scorer = None
    if any(r in SCORED_RULES for r in rules):
        # the scorer runs where the completions are gathered: a reward model loads on the main process only
        if cfg.scorer not in (None, "self") and ranks.is_main:
            scorer = make_scorer(cfg.scorer, trust_remote_code=cfg.trust_remote_code)
        else:
            scorer = make_scorer("self")
    sampled_rules = [r for r in rules if r in SAMPLED_RULES]
    return BenchPlan(cfg=cfg, pairs=pairs, rules=rules, sampled_rules=sampled_rules,
                     grid=n_grid(cfg.samples) if sampled_rules else [], problems=problems, task_info=task_info,
                     system_prompt=DEFAULT_SYSTEM_PROMPT if cfg.system_prompt is None else cfg.system_prompt,
                     scorer=scorer, started=started, ranks=ranks)


def bench_model(plan: BenchPlan, name: str, path: str) -> tuple[dict | None, list[dict]]:
    """One model: load it as deployed, generate (greedy and N samples), measure agreement and cost,
    score the answers; returns its results entry and its per-completion records (on the processes
    that only generated their share: None and [])."""
    from distill.bench.loading import load_for_bench
    from distill.models import default_device

    cfg, ranks = plan.cfg, plan.ranks
    t_load = time.perf_counter()
    meter = cost_mod.PeakMemory(device=default_device())
    with meter:
        loaded = load_for_bench(name, path, quant=cfg.quant, trust_remote_code=cfg.trust_remote_code)
        load_s = time.perf_counter() - t_load
        if plan.estimate is None and (cfg.progress or cfg.time_budget is not None):
            _estimate(plan, name, loaded.model, loaded.tokenizer)
        greedy, sampled, stats = _generate(plan, name, loaded.model, loaded.tokenizer)
        agreement = _agreement(plan, loaded.model, loaded.tokenizer) if ranks.is_main else None
    peak_bytes = meter.peak_bytes
    if ranks.distributed:
        everyone = ranks.gather((stats.new_tokens, stats.seconds, meter.peak_bytes))
        stats.new_tokens = sum(t for t, _, _ in everyone)
        stats.seconds = max(sec for _, sec, _ in everyone)  # the processes ran side by side
        peaks = [b for _, _, b in everyone if b is not None]
        peak_bytes = max(peaks) if peaks else None
    if not ranks.is_main:  # the main process scores, measures and reports
        del loaded
        gc.collect()
        _empty_cuda_cache()
        return None, []
    cost = {
        "parameters": cost_mod.parameter_count(loaded.model),
        "size_on_disk_bytes": cost_mod.size_on_disk(path),
        "quantization": cost_mod.quantization_kind(loaded.model) + (" (from gguf)" if loaded.source == "gguf" else ""),
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": meter.kind,
        "generated_tokens": stats.new_tokens,
        "generation_seconds": round(stats.seconds, 3),
        "tokens_per_s": (stats.new_tokens / stats.seconds) if stats.seconds > 0 else None,
        "load_seconds": round(load_s, 3),
        "batch_size": cfg.batch_size or "auto",
        "processes": ranks.world,
    }
    if loaded.source == "adapter" and loaded.base_path:
        base_size = cost_mod.size_on_disk(loaded.base_path)
        cost["size_on_disk_bytes"] = (cost["size_on_disk_bytes"] or 0) + (base_size or 0)
    accuracy, curves, parse_rate, details = _score(plan, name, greedy, sampled)
    result = {
        "name": name,
        "path": str(path),
        "source": loaded.source,
        "base_path": loaded.base_path,
        "accuracy": accuracy,
        "curves": curves,
        "answer_parse_rate": parse_rate,
        "agreement": agreement,
        "cost": cost,
    }
    del loaded
    gc.collect()
    _empty_cuda_cache()
    return result, details


def _generate(plan: BenchPlan, name: str, model, tok):
    """Greedy completions (one per problem) and N sampled ones, with their generation stats."""
    from distill.models.sampling import format_prompt

    cfg, ranks = plan.cfg, plan.ranks
    prompts = [format_prompt(tok, p.question, plan.system_prompt) for p in plan.problems]
    stats = _new_stats()
    rows = len(plan.problems) * _rows_each(plan)
    bar = _bar(cfg.progress and ranks.is_main, name, -(-rows // ranks.world))  # the main process's share
    on_row = (lambda _i, _c: bar.update(1)) if bar is not None else None
    # greedy and sampled rows decode in one pool: one prefill per problem, and the batch stays full
    greedy, sampled = _shared_completions(
        ranks, model, tok, prompts, num_samples=cfg.samples if plan.sampled_rules else 0,
        temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
        batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens, greedy=True, stats=stats, on_row=on_row)
    if bar is not None:
        bar.close()
    greedy = [[c] for c in greedy] if "greedy" in plan.rules else None
    return greedy, (sampled if plan.sampled_rules else None), stats


def _rows_each(plan: BenchPlan) -> int:
    """Completions per problem: the greedy one and the N samples."""
    return (1 if "greedy" in plan.rules else 0) + (plan.cfg.samples if plan.sampled_rules else 0)


def _estimate(plan: BenchPlan, name: str, model, tok) -> None:
    """Calibrate on the first model, print what the generation will take (every model assumed as fast
    as this one: list the largest first for an upper bound) and cut the problems to `time_budget`.

    Why: `distill bench` on a CPU can run for many minutes; a user should know before, not after.
    Every process calibrates (each needs its model warm anyway); the main process's figures decide,
    so that all processes keep the same problems.
    """
    from distill.models.sampling import estimate_seconds, format_prompt

    cfg, ranks = plan.cfg, plan.ranks
    rows_each = _rows_each(plan)
    problems = plan.problems
    prompts = [format_prompt(tok, p.question, plan.system_prompt) for p in problems]
    est = estimate_seconds(model, tok, prompts, rows_per_prompt=max(rows_each, 1), max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens)
    est = ranks.broadcast(est)
    models = len(plan.pairs)
    total = est["seconds"] * models / ranks.world
    work = (f"{len(problems)} problems x {models} model{'s' if models > 1 else ''} x {rows_each} "
            f"completion{'s' if rows_each > 1 else ''} of <= {cfg.max_new_tokens} tokens")
    note = ""
    if cfg.time_budget is not None and total > cfg.time_budget:
        keep = max(1, int(len(problems) * cfg.time_budget / total))
        note = f"; --time-budget {cfg.time_budget:g} s: using the first {keep} of {len(problems)} problems"
        total = total * keep / len(problems)
        plan.problems = problems[:keep]
        plan.task_info["num_problems"] = keep
    if ranks.is_main:
        print(f"bench: {work}: about {total / 60:.1f} minutes here (at most: every completion at full length; "
              f"measured on {name}: prefill {est['prefill_tokens_per_s']:.0f} tok/s, decode "
              f"{est['decode_tokens_per_s']:.0f} tok/s at batch {est['batch']}){note}", file=sys.stderr, flush=True)
    plan.estimate = {"seconds": round(total, 1), "measured_on": name,
                     "prefill_tokens_per_s": round(est["prefill_tokens_per_s"], 1),
                     "decode_tokens_per_s": round(est["decode_tokens_per_s"], 1), "batch": est["batch"],
                     "problems_used": len(plan.problems)}


def _agreement(plan: BenchPlan, model, tok) -> dict | None:
    """KL, top-1 agreement and ECE against the held-out teacher cache (an error entry, not a crash)."""
    cfg = plan.cfg
    if cfg.held_out_cache is None:
        return None
    from distill.bench.agreement import agreement_with_teacher

    try:
        return agreement_with_teacher(model, tok, str(cfg.held_out_cache), batch_size=max(1, (cfg.batch_size or 8) // 2),
                                      max_samples=cfg.held_out_limit)
    except DistillError as err:
        return {"error": str(err)}


def _score(plan: BenchPlan, name: str, greedy, sampled):
    """Accuracy per rule (with curves over n), the answer parse rate and the per-completion records."""
    from teachers.verify import answers_match, extract_answer

    problems, details = plan.problems, []
    accuracy: dict = {}
    curves: dict = {}
    parsed = total = 0
    if greedy is not None:
        g_correct = 0
        for prob, comps in zip(problems, greedy):
            pred = _answer_of(comps[0].text, extract_answer)
            ok = pred is not None and bool(answers_match(pred, prob.gold))
            g_correct += ok
            parsed += pred is not None
            total += 1
            details.append({"model": name, "id": prob.id, "kind": "greedy", "gold": prob.gold,
                            "answer": pred, "correct": ok, "num_tokens": comps[0].num_tokens,
                            "finished": comps[0].finished, "text": comps[0].text})
        accuracy["greedy"] = accuracy_entry(g_correct, len(problems))
    if sampled is not None:
        per_problem = []
        for prob, comps in zip(problems, sampled):
            weights = plan.scorer.score([prob.question] * len(comps), comps) if plan.scorer else [0.0] * len(comps)
            row = []
            for i, (c, w) in enumerate(zip(comps, weights)):
                pred = _answer_of(c.text, extract_answer)
                ok = pred is not None and bool(answers_match(pred, prob.gold))
                parsed += pred is not None
                total += 1
                row.append(Sample(answer=normalise_answer(pred), correct=ok, score=float(w)))
                details.append({"model": name, "id": prob.id, "kind": "sample", "index": i, "gold": prob.gold,
                                "answer": pred, "correct": ok, "score": float(w), "num_tokens": c.num_tokens,
                                "finished": c.finished, "text": c.text})
            per_problem.append(row)
        counts = accuracy_curves(per_problem, plan.sampled_rules, plan.grid)
        for rule in plan.sampled_rules:
            curves[rule] = {str(n): accuracy_entry(counts[rule][n], len(problems)) for n in plan.grid}
            accuracy[rule] = curves[rule][str(plan.cfg.samples)]
    return accuracy, curves, (parsed / total if total else None), details


def finish_bench(plan: BenchPlan, model_results: list[dict], details: list[dict], *, print_summary: bool = False) -> dict:
    """Write results.json, results.md, the plots and samples.jsonl; return the results dict."""
    cfg, scorer, ranks = plan.cfg, plan.scorer, plan.ranks
    if scorer is not None:
        scorer.close()
    if not ranks.is_main:
        return ranks.broadcast(None)
    results = {
        "version": RESULTS_VERSION,
        "task": plan.task_info,
        "settings": {
            "samples": cfg.samples, "rules": plan.rules, "scorer": (scorer.name if scorer else None),
            "scorer_description": (scorer.description if scorer else None),
            "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "batch_tokens": cfg.batch_tokens, "quant": cfg.quant,
            "system_prompt": plan.system_prompt, "time_budget": cfg.time_budget, "estimate": plan.estimate,
            "held_out_cache": str(cfg.held_out_cache) if cfg.held_out_cache is not None else None,
            "tie_break": "among tied answers the one seen first in sampling order wins; only parsable samples vote",
            "curves": "accuracy at n uses the first n samples of each problem",
        },
        "grid": plan.grid,
        "models": model_results,
        "wall_seconds": time.perf_counter() - plan.started,
        "environment": _environment(),
    }
    out = Path(cfg.out)
    paths = write_report(results, out)
    _write_details(out / "samples.jsonl", details)
    paths["samples"] = str(out / "samples.jsonl")
    results["files"] = paths
    if print_summary:
        print(terminal_summary(results, paths))
    return ranks.broadcast(results)


def _shared_completions(ranks, model, tok, prompts, **kwargs):
    """`sample_completions` (greedy=True) with the problems dealt over the processes, gathered on every
    process: (greedy [one per problem], sampled [N per problem])."""
    from distill.models.sampling import sample_completions

    if not ranks.distributed:
        return sample_completions(model, tok, prompts, **kwargs)
    parts = ranks.gather(sample_completions(model, tok, prompts, take=ranks.take, **kwargs))
    greedy = [next(g[p] for g, _ in parts if g[p] is not None) for p in range(len(prompts))]
    sampled = [[next(s[p][i] for _, s in parts if s[p][i] is not None) for i in range(len(parts[0][1][p]))]
               for p in range(len(prompts))]
    return greedy, sampled


def _write_details(path: Path, details: list[dict]) -> None:
    atomic_write_jsonl(path, details)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _new_stats():
    from distill.models.sampling import GenerationStats

    return GenerationStats()


def _bar(progress: bool, name: str, total: int):
    if not progress or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"bench {name}", unit="completion", file=sys.stderr, dynamic_ncols=True)
