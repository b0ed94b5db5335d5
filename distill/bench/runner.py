"""`run_bench(...)`: the whole benchmark as one Python call (the CLI and the pipeline demo use it).

For each model, in the order given: load it as deployed, generate one greedy completion per problem
and N sampled completions, score them, apply the selection rules, optionally measure agreement with
the teacher on a held-out cache, and record the cost columns. Then write results.json, results.md and
the plots. Everything the user can get wrong is checked before the first model loads.
"""

from __future__ import annotations

import gc
import platform
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from distill.bench import cost as cost_mod
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
from distill.errors import DistillError
from distill.io import atomic_write_jsonl

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


def run_bench(
    models: Sequence[str] | Mapping[str, str],
    *,
    task: str = "synthetic",
    out: str | Path,
    limit: int | None = None,
    samples: int = 1,
    select: str | Sequence[str] = DEFAULT_RULES,
    scorer: str | None = "self",
    held_out_cache: str | None = None,
    held_out_limit: int | None = None,
    quant: str = "auto",
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    system_prompt: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    print_summary: bool = False,
    ranks=None,
) -> dict:
    """Benchmark `models` on `task`; write the report into `out`; return the results dict.

    Under `accelerate launch --num_processes N` (`ranks`, default: what the launcher says) every
    process loads each model and generates its share of the batches (dealt round robin, the batches of
    a one-process run); the main process gathers the completions, scores them, measures agreement and
    writes the report. Every process returns the results.
    """
    from distill.bench.loading import QUANT_CHOICES, load_for_bench
    from distill.bench.scorers import make_scorer
    from distill.bench.tasks import load_task
    from distill.models import default_device
    from distill.ranks import current_ranks

    t_start = time.perf_counter()
    ranks = ranks or current_ranks()
    pairs = parse_model_specs(models)
    if samples < 1:
        raise DistillError(f"--samples must be at least 1, got {samples}")
    if max_new_tokens < 1:
        raise DistillError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise DistillError(f"--batch-size must be at least 1, got {batch_size}")
    if not (temperature > 0):
        raise DistillError(f"--temperature must be > 0 for sampling, got {temperature} (greedy is always run separately)")
    if not (0 < top_p <= 1):
        raise DistillError(f"--top-p must be in (0, 1], got {top_p}")
    if held_out_limit is not None and held_out_limit < 1:
        raise DistillError(f"--held-out-limit must be at least 1, got {held_out_limit}")
    if quant not in QUANT_CHOICES:
        raise DistillError(f"unknown --quant {quant!r}; use one of {', '.join(QUANT_CHOICES)}")
    rules = canonical_rules(select)
    if samples == 1:
        dropped = [r for r in rules if r in SAMPLED_RULES]
        rules = [r for r in rules if r not in SAMPLED_RULES]
        if not rules:
            raise DistillError(f"--select {','.join(dropped)} needs --samples N with N >= 2")
    out = Path(out)
    _check_out(out)
    if held_out_cache is not None:
        from distill.cache.format import read_manifest

        read_manifest(Path(held_out_cache))  # a missing / malformed cache fails before any model loads
    problems, task_info = load_task(task, limit=limit)

    from distill.models.sampling import DEFAULT_SYSTEM_PROMPT, format_prompt
    from teachers.verify import answers_match, extract_answer

    if system_prompt is None:
        system_prompt = DEFAULT_SYSTEM_PROMPT
    needs_scores = any(r in SCORED_RULES for r in rules)
    # the scorer runs where the completions are gathered: a reward model loads on the main process only
    scorer_obj = (make_scorer(scorer, trust_remote_code=trust_remote_code)
                  if (needs_scores and scorer not in (None, "self") and ranks.is_main) else None)
    if scorer_obj is None and needs_scores:
        scorer_obj = make_scorer("self")
    sampled_rules = [r for r in rules if r in SAMPLED_RULES]
    grid = n_grid(samples) if sampled_rules else []

    details: list[dict] = []
    model_results = []
    for name, path in pairs:
        t_load = time.perf_counter()
        meter = cost_mod.PeakMemory(device=default_device())
        with meter:
            loaded = load_for_bench(name, path, quant=quant, trust_remote_code=trust_remote_code)
            load_s = time.perf_counter() - t_load
            model, tok = loaded.model, loaded.tokenizer
            prompts = [format_prompt(tok, p.question, system_prompt) for p in problems]
            stats = _new_stats()
            rows = len(problems) * ((1 if "greedy" in rules else 0) + (samples if sampled_rules else 0))
            bar = _bar(progress and ranks.is_main, name, -(-rows // ranks.world))  # the main process's share
            on_batch = (lambda rows, _t: bar.update(rows)) if bar is not None else None
            greedy = None
            if "greedy" in rules:
                greedy = _shared_completions(ranks, model, tok, prompts, num_samples=1, temperature=0.0, top_p=1.0,
                                             max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                                             stats=stats, on_batch=on_batch)
            sampled = None
            if sampled_rules:
                sampled = _shared_completions(ranks, model, tok, prompts, num_samples=samples, temperature=temperature,
                                              top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                                              batch_size=batch_size, stats=stats, on_batch=on_batch)
            if bar is not None:
                bar.close()
            agreement = None
            if held_out_cache is not None and ranks.is_main:
                from distill.bench.agreement import agreement_with_teacher

                try:
                    agreement = agreement_with_teacher(model, tok, held_out_cache, batch_size=max(1, batch_size // 2),
                                                       max_samples=held_out_limit)
                except DistillError as err:
                    agreement = {"error": str(err)}
        if ranks.distributed:
            everyone = ranks.gather((stats.new_tokens, stats.seconds, meter.peak_bytes))
            stats.new_tokens = sum(t for t, _, _ in everyone)
            stats.seconds = max(sec for _, sec, _ in everyone)  # the processes ran side by side
            peaks = [b for _, _, b in everyone if b is not None]
            peak_bytes = max(peaks) if peaks else None
        else:
            peak_bytes = meter.peak_bytes
        if not ranks.is_main:  # the main process scores, measures and reports
            del model, loaded
            gc.collect()
            _empty_cuda_cache()
            continue
        cost = {
            "parameters": cost_mod.parameter_count(model),
            "size_on_disk_bytes": cost_mod.size_on_disk(path),
            "quantization": cost_mod.quantization_kind(model) + (" (from gguf)" if loaded.source == "gguf" else ""),
            "peak_memory_bytes": peak_bytes,
            "peak_memory_kind": meter.kind,
            "generated_tokens": stats.new_tokens,
            "generation_seconds": round(stats.seconds, 3),
            "tokens_per_s": (stats.new_tokens / stats.seconds) if stats.seconds > 0 else None,
            "load_seconds": round(load_s, 3),
            "batch_size": batch_size,
            "processes": ranks.world,
        }
        if loaded.source == "adapter" and loaded.base_path:
            base_size = cost_mod.size_on_disk(loaded.base_path)
            cost["size_on_disk_bytes"] = (cost["size_on_disk_bytes"] or 0) + (base_size or 0)

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
                weights = scorer_obj.score([prob.question] * len(comps), comps) if scorer_obj else [0.0] * len(comps)
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
            counts = accuracy_curves(per_problem, sampled_rules, grid)
            for rule in sampled_rules:
                curves[rule] = {str(n): accuracy_entry(counts[rule][n], len(problems)) for n in grid}
                accuracy[rule] = curves[rule][str(samples)]
        model_results.append({
            "name": name,
            "path": str(path),
            "source": loaded.source,
            "base_path": loaded.base_path,
            "accuracy": accuracy,
            "curves": curves,
            "answer_parse_rate": parsed / total if total else None,
            "agreement": agreement,
            "cost": cost,
        })
        del model, loaded
        gc.collect()
        _empty_cuda_cache()

    if scorer_obj is not None:
        scorer_obj.close()
    if not ranks.is_main:
        return ranks.broadcast(None)
    results = {
        "version": RESULTS_VERSION,
        "task": task_info,
        "settings": {
            "samples": samples, "rules": rules, "scorer": (scorer_obj.name if scorer_obj else None),
            "scorer_description": (scorer_obj.description if scorer_obj else None),
            "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
            "batch_size": batch_size, "quant": quant, "system_prompt": system_prompt,
            "held_out_cache": held_out_cache,
            "tie_break": "among tied answers the one seen first in sampling order wins; only parsable samples vote",
            "curves": "accuracy at n uses the first n samples of each problem",
        },
        "grid": grid,
        "models": model_results,
        "wall_seconds": time.perf_counter() - t_start,
        "environment": _environment(),
    }
    paths = write_report(results, out)
    _write_details(out / "samples.jsonl", details)
    paths["samples"] = str(out / "samples.jsonl")
    results["files"] = paths
    if print_summary:
        print(terminal_summary(results, paths))
    return ranks.broadcast(results)


def _shared_completions(ranks, model, tok, prompts, **kwargs):
    """`sample_completions` with the batches dealt over the processes, gathered on every process."""
    from distill.models.sampling import sample_completions

    if not ranks.distributed:
        return sample_completions(model, tok, prompts, **kwargs)
    grids = ranks.gather(sample_completions(model, tok, prompts, take=ranks.take, **kwargs))
    return [[next(g[p][s] for g in grids if g[p][s] is not None) for s in range(len(grids[0][p]))]
            for p in range(len(prompts))]


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
