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
    SEARCH_RULES,
    Sample,
    accuracy_curves,
    canonical_rules,
    n_grid,
    normalise_answer,
)
from distill.bench.stats import accuracy_entry
from distill.bench.steps import AGGREGATES, STEP_MODES
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


def step_spec(text: str):
    """The search's step scorer: `teacher=DIR` (any teacher* name: the per-step log-prob) or `NAME=prm:DIR`."""
    from distill.bench.scorers import ScorerSpec, parse_scorer_specs

    (spec,) = parse_scorer_specs([text])
    if spec.kind.startswith("teacher"):
        return ScorerSpec(spec.name, "teacher-steps", spec.target, 1.0)
    if spec.kind != "step-reward-model":
        raise DistillError(f"--step-scorer {text!r} is not a step scorer: use teacher=DIR or NAME=prm:DIR")
    return spec


# Rows per forward of the scorers, the search's expansions and the agreement pass when --batch-size is
# not given (generation sizes its batches by --batch-tokens instead).
SCORING_BATCH = 8


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
    scorer: list[str] = option(help="Scorer for best-of-N, repeatable: NAME=SPEC[:WEIGHT] with SPEC 'self' (the "
                                    "model's own mean token log-prob) or a reward model directory; teacher=DIR "
                                    "(teacher-sum=DIR) scores by the teacher's mean (summed) log-prob. Several: "
                                    "weighted sum, each also reported alone.",
                               default_factory=lambda: ["self"], metavar="NAME=SPEC[:WEIGHT]")
    steps: str = option("auto", "How step-level scorers split a trace: lines, step-k ('Step k' markers), paragraphs "
                                "(inside <think>), or auto.", choices=STEP_MODES)
    step_aggregate: str = option("min", "How step scores become one weight: min, product or last.", choices=AGGREGATES)
    step_scorer: str | None = option(None, "Step scorer guiding --select beam,mcts: teacher=DIR (the teacher's per-step "
                                           "log-prob) or NAME=prm:DIR (a trained step scorer). Search steps are lines.",
                                     metavar="SPEC")
    beam_size: int = option(2, "Beam search: prefixes kept after every step.", minimum=1)
    search_width: int = option(2, "Search: one-step continuations sampled per kept prefix (beam) or children per "
                                   "node (MCTS).", minimum=1)
    search_steps: int = option(8, "Search: most steps (lines) per trace.", minimum=1)
    step_max_tokens: int = option(48, "Search: longest step in tokens.", minimum=1)
    mcts_expansions: int = option(8, "MCTS: expansions (iterations) per problem.", minimum=1)
    mcts_rollouts: int = option(1, "MCTS: rollouts to the end per expansion.", minimum=1)
    uct_c: float = option(1.0, "MCTS: exploration constant of UCT.", minimum=0)
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
        from distill.bench.scorers import parse_scorer_specs

        if isinstance(self.scorer, str):  # the Python API and old configs pass one scorer as a string
            self.scorer = [self.scorer]
        parse_scorer_specs(self.scorer)  # a malformed --scorer fails before any model loads
        rules = canonical_rules(self.select)
        if any(r in SEARCH_RULES for r in rules):
            if not self.step_scorer:
                raise DistillError(f"{name('select')} beam/mcts needs {name('step_scorer')} teacher=DIR or NAME=prm:DIR")
            step_spec(self.step_scorer)
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
    step_scorer: object | None
    started: float
    ranks: object  # distill.ranks.Ranks: this process among the launcher's
    estimate: dict | None = None  # the up-front time estimate, made on the first model


def run_bench(models: Sequence[str] | Mapping[str, str], *, print_summary: bool = False, ranks=None,
              **settings) -> dict:
    """Benchmark `models` on the task; write the report into `out`; return the results dict.

    `settings` are the other `BenchConfig` fields (out, task, samples, ...): their defaults and checks
    live there, once for the CLI, the run config and this call.

    Under `accelerate launch --multi_gpu --num_processes N` (`ranks`, default: what the launcher says) every
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
    from distill.bench.scorers import make_scorers, make_step_scorer
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
    system_prompt = DEFAULT_SYSTEM_PROMPT if cfg.system_prompt is None else cfg.system_prompt
    scorer = None
    if any(r in SCORED_RULES for r in rules):
        # the scorers run where the completions are gathered: reward models and teachers load on the main process only
        scorer = make_scorers(cfg.scorer, system_prompt=system_prompt, batch_size=cfg.batch_size or SCORING_BATCH,
                              trust_remote_code=cfg.trust_remote_code, only_self=not ranks.is_main,
                              steps=cfg.steps, step_aggregate=cfg.step_aggregate)
    step_scorer = None
    if any(r in SEARCH_RULES for r in rules) and ranks.is_main:  # the searches run on the main process
        step_scorer = make_step_scorer(step_spec(cfg.step_scorer), system_prompt=system_prompt,
                                       batch_size=cfg.batch_size or SCORING_BATCH, aggregate=cfg.step_aggregate,
                                       trust_remote_code=cfg.trust_remote_code)
    sampled_rules = [r for r in rules if r in SAMPLED_RULES]
    return BenchPlan(cfg=cfg, pairs=pairs, rules=rules, sampled_rules=sampled_rules,
                     grid=n_grid(cfg.samples) if sampled_rules else [], problems=problems, task_info=task_info,
                     system_prompt=system_prompt, scorer=scorer, step_scorer=step_scorer, started=started, ranks=ranks)


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
        searched, search_s = _search(plan, name, loaded.model, loaded.tokenizer) if ranks.is_main else ({}, 0.0)
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
        "search_seconds": round(search_s, 3),
        "batch_size": cfg.batch_size or "auto",
        "processes": ranks.world,
    }
    if loaded.source == "adapter" and loaded.base_path:
        base_size = cost_mod.size_on_disk(loaded.base_path)
        cost["size_on_disk_bytes"] = (cost["size_on_disk_bytes"] or 0) + (base_size or 0)
    accuracy, curves, compute, parse_rate, details = _score(plan, name, greedy, sampled, searched)
    result = {
        "name": name,
        "path": str(path),
        "source": loaded.source,
        "base_path": loaded.base_path,
        "accuracy": accuracy,
        "curves": curves,
        "compute": compute,
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


def _search(plan: BenchPlan, name: str, model, tok) -> tuple[dict, float]:
    """{rule: [SearchResult per problem]} for the search rules, and the seconds they took."""
    rules = [r for r in plan.rules if r in SEARCH_RULES]
    if not rules:
        return {}, 0.0
    from distill.bench.search import SEARCHES, SearchSettings
    from distill.models.sampling import format_prompt, newline_ids

    cfg = plan.cfg
    settings = SearchSettings.from_bench(cfg)
    stops = newline_ids(tok)
    t0 = time.perf_counter()
    out = {}
    bar = _bar(cfg.progress, f"{name} search", len(rules) * len(plan.problems))
    for rule in rules:
        out[rule] = []
        for prob in plan.problems:
            prompt = format_prompt(tok, prob.question, plan.system_prompt)
            out[rule].append(SEARCHES[rule](model, tok, plan.step_scorer, prob.question, prompt, settings, stops))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out, time.perf_counter() - t0


def _agreement(plan: BenchPlan, model, tok) -> dict | None:
    """KL, top-1 agreement and ECE against the held-out teacher cache (an error entry, not a crash)."""
    cfg = plan.cfg
    if cfg.held_out_cache is None:
        return None
    from distill.bench.agreement import agreement_with_teacher

    try:
        return agreement_with_teacher(model, tok, str(cfg.held_out_cache), batch_size=max(1, (cfg.batch_size or SCORING_BATCH) // 2),
                                      max_samples=cfg.held_out_limit)
    except DistillError as err:
        return {"error": str(err)}


def _score(plan: BenchPlan, name: str, greedy, sampled, searched=None):
    """Accuracy per rule (with curves over n and token costs), the answer parse rate and the
    per-completion records. With several scorers, best-of-N and weighted best-of-N are computed for
    their combination (the plain rule names) and for each scorer alone (`rule[NAME]`)."""
    from distill.bench.compute import compute_points
    from teachers.verify import answers_match, extract_answer

    problems, details = plan.problems, []
    accuracy: dict = {}
    curves: dict = {}
    compute: dict = {}
    parsed = total = 0
    if greedy is not None:
        g_correct, g_tokens = 0, 0
        for prob, comps in zip(problems, greedy):
            pred = _answer_of(comps[0].text, extract_answer)
            ok = pred is not None and bool(answers_match(pred, prob.gold))
            g_correct += ok
            g_tokens += comps[0].num_tokens
            parsed += pred is not None
            total += 1
            details.append({"model": name, "id": prob.id, "kind": "greedy", "gold": prob.gold,
                            "answer": pred, "correct": ok, "num_tokens": comps[0].num_tokens,
                            "finished": comps[0].finished, "text": comps[0].text})
        accuracy["greedy"] = accuracy_entry(g_correct, len(problems))
        compute["greedy"] = [{"samples": 1, "generated_tokens": g_tokens / max(1, len(problems)), "scorer_tokens": 0.0,
                              "total_tokens": g_tokens / max(1, len(problems)), **accuracy["greedy"]}]
    if sampled is not None:
        scorer = plan.scorer
        views = _scored_views(plan)  # rule key -> (base rule, scorer name or None for the combination)
        per_view: dict[str, list] = {key: [] for key in views}
        plain, gen_tokens, view_tokens = [], [], {key: [] for key in views}
        for prob, comps in zip(problems, sampled):
            if scorer is not None:
                each, combined = scorer.evaluate([prob.question] * len(comps), comps)
            else:
                each, combined = {}, [None] * len(comps)
            row, answers = [], []
            for i, c in enumerate(comps):
                pred = _answer_of(c.text, extract_answer)
                ok = pred is not None and bool(answers_match(pred, prob.gold))
                parsed += pred is not None
                total += 1
                answers.append((normalise_answer(pred), ok))
                weight = combined[i].weight if combined[i] is not None else 0.0
                row.append(Sample(answer=normalise_answer(pred), correct=ok, score=float(weight)))
                record = {"model": name, "id": prob.id, "kind": "sample", "index": i, "gold": prob.gold,
                          "answer": pred, "correct": ok, "score": float(weight), "num_tokens": c.num_tokens,
                          "finished": c.finished, "text": c.text}
                if combined[i] is not None:
                    record["scorer_tokens"] = combined[i].tokens
                if len(each) > 1 or any(s[i].extra for s in each.values()):
                    record["scores"] = {k: {"weight": v[i].weight, "tokens": v[i].tokens, **v[i].extra}
                                        for k, v in each.items()}
                details.append(record)
            plain.append(row)
            gen_tokens.append([c.num_tokens for c in comps])
            for key, (_, who) in views.items():
                scored = combined if who is None else each[who]
                per_view[key].append([Sample(a, ok, float(s.weight)) for (a, ok), s in zip(answers, scored)])
                view_tokens[key].append([s.tokens for s in scored])
        unscored = [r for r in plan.sampled_rules if r not in SCORED_RULES]
        counts = accuracy_curves(plain, unscored, plan.grid)
        for key, (rule, _) in views.items():
            counts[key] = accuracy_curves(per_view[key], [rule], plan.grid)[rule]
        zeros = [[0] * len(g) for g in gen_tokens]
        for key in unscored + list(views):
            curves[key] = {str(n): accuracy_entry(counts[key][n], len(problems)) for n in plan.grid}
            accuracy[key] = curves[key][str(plan.cfg.samples)]
            compute[key] = compute_points(curves[key], gen_tokens, view_tokens.get(key, zeros), plan.grid)
    for rule, results in (searched or {}).items():
        correct = gen = sc = 0
        for prob, res in zip(problems, results):
            pred = _answer_of(res.text, extract_answer)
            ok = pred is not None and bool(answers_match(pred, prob.gold))
            correct += ok
            gen += res.generated_tokens
            sc += res.scorer_tokens
            details.append({"model": name, "id": prob.id, "kind": rule, "gold": prob.gold, "answer": pred,
                            "correct": ok, "value": res.value, "num_tokens": res.generated_tokens,
                            "scorer_tokens": res.scorer_tokens, "finished": res.finished, "text": res.text})
        count = max(1, len(problems))
        accuracy[rule] = accuracy_entry(correct, len(problems))
        compute[rule] = [{"samples": None, "generated_tokens": gen / count, "scorer_tokens": sc / count,
                          "total_tokens": (gen + sc) / count, **accuracy[rule]}]
    return accuracy, curves, compute, (parsed / total if total else None), details


def _scored_views(plan: BenchPlan) -> dict[str, tuple[str, str | None]]:
    """The scored rule columns: the plain rule names use the combination of the scorers; with several
    scorers each one's own result is added as `rule[NAME]`."""
    rules = [r for r in plan.sampled_rules if r in SCORED_RULES]
    views: dict[str, tuple[str, str | None]] = {r: (r, None) for r in rules}
    if plan.scorer is not None and len(plan.scorer.names) > 1:
        for who in plan.scorer.names:
            for r in rules:
                views[f"{r}[{who}]"] = (r, who)
    return views


def result_rules(plan: BenchPlan) -> list[str]:
    """Every accuracy column of the report, in table order."""
    keys = list(plan.rules)
    if plan.sampled_rules:
        keys += [k for k in _scored_views(plan) if k not in keys]
    return keys


def finish_bench(plan: BenchPlan, model_results: list[dict], details: list[dict], *, print_summary: bool = False) -> dict:
    """Write results.json, results.md, the plots and samples.jsonl; return the results dict."""
    cfg, scorer, ranks = plan.cfg, plan.scorer, plan.ranks
    if scorer is not None:
        scorer.close()
    if plan.step_scorer is not None:
        plan.step_scorer.close()
    if not ranks.is_main:
        return ranks.broadcast(None)
    results = {
        "version": RESULTS_VERSION,
        "task": plan.task_info,
        "settings": {
            "samples": cfg.samples, "rules": plan.rules, "scorer": (scorer.name if scorer else None),
            "scorer_description": (scorer.description if scorer else None),
            "scorers": (scorer.describe() if scorer else []), "columns": result_rules(plan),
            "steps": cfg.steps, "step_aggregate": cfg.step_aggregate,
            "search": ({"step_scorer": cfg.step_scorer, "step_scorer_description": plan.step_scorer.description,
                        "beam_size": cfg.beam_size, "width": cfg.search_width, "max_steps": cfg.search_steps,
                        "step_max_tokens": cfg.step_max_tokens, "mcts_expansions": cfg.mcts_expansions,
                        "mcts_rollouts": cfg.mcts_rollouts, "uct_c": cfg.uct_c, "steps": "lines"}
                       if plan.step_scorer is not None else None),
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
