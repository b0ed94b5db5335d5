"""Keep the traces that earn their rewards (STaR / R1 rejection sampling) and write them as chat records.

Modes, per prompt:
  all-correct    every trace whose answer is right (and, with require_format, well formed)
  first-correct  the passing trace with the lowest sample index (cheapest to reproduce)
  best           one passing trace: highest format reward, then highest mean log-prob under the teacher
                 (its most confident correct reasoning), then lowest sample index
  all            every trace, rewards only reported (for demos with teachers too weak to be filtered)

The output is the cache's input format: one JSON line per kept trace with `messages` = [system (if the
trace was generated with one), user question, assistant completion], an `id` of `{prompt id}/{sample}`,
and the trace's metadata. A report (yield per prompt and overall) is printed, returned, and written as
JSON next to the output (`kept.jsonl` -> `kept.report.json`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError
from distill.io import atomic_write_json, atomic_write_jsonl
from distill.options import option, validate
from teachers.generate import read_traces
from teachers.verify import extract_answer, format_ok, answers_match

KEEP_MODES = ("all-correct", "first-correct", "best", "all")


@dataclass
class FilterConfig:
    """`distill teacher filter` and the `[filter]` section of a run config (declared once)."""

    traces: Path = option(help="Traces JSONL written by `distill teacher generate`.", argument=True)
    out: Path = option(help="Kept traces as chat records (the cache's input).")
    keep: str = option("all-correct", "Which passing traces to keep per problem (all: no filtering).", choices=KEEP_MODES)
    require_format: bool = option(True, "Also require one well-formed <think>...</think> block.")

    def check(self, name) -> None:
        if self.traces is not None and self.out is not None and Path(self.traces).resolve() == Path(self.out).resolve():
            raise DistillError(f"{name('out')} must differ from the traces file")


def report_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".report.json")


def _kept_record(trace: dict, acc: bool, fmt: bool, pred: str | None) -> dict:
    messages = []
    system = (trace.get("settings") or {}).get("system_prompt")
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": trace["question"]})
    messages.append({"role": "assistant", "content": trace["completion"]})
    return {
        "id": f"{trace['prompt_id']}/{trace['sample']}",
        "messages": messages,
        "prompt_id": trace["prompt_id"], "sample": trace["sample"], "gold": trace.get("gold"), "pred": pred,
        "reward": {"accuracy": float(acc), "format": float(fmt)},
        "mean_logprob": trace.get("mean_logprob"), "num_tokens": trace.get("num_tokens"),
        "teacher": trace.get("teacher"), "settings": trace.get("settings"),
        **({"rationalized": True} if trace.get("rationalized") else {}),
    }


def filter_traces(traces: str | Path, out: str | Path, *, echo=print, verify=None, **settings) -> dict:
    """Filter the traces file `traces` into `out` (atomic write); returns the yield report.

    `settings` are the other `FilterConfig` fields (keep, require_format), checked there. `verify
    (completion, gold) -> bool` decides accuracy (default: `teachers.verify`'s answer match); give
    the one trace generation used for STaR.

    STaR rationalizations (traces with `rationalized: true`, generated with the gold answer as a hint)
    count only for a problem that no sampled trace passed, and only those that pass are kept, in any
    mode: a hinted trace that misses the answer it was told is no sample of anything. The report's
    accuracy and yields are the sampled traces'; `solved_by_sampling` and `solved_by_rationalization`
    count the problems each way solved.
    """
    cfg = validate(FilterConfig(traces=Path(traces), out=Path(out), **settings))
    in_path, out_path, keep, require_format = cfg.traces, cfg.out, cfg.keep, cfg.require_format
    if not in_path.is_file():
        raise DistillError(f"traces file not found: {in_path}")
    traces = read_traces(in_path)
    if not traces:
        raise DistillError(f"no traces in {in_path}")
    for i, t in enumerate(traces, 1):
        missing = [k for k in ("prompt_id", "sample", "question", "completion", "gold") if k not in t]
        if missing:
            raise DistillError(f"{in_path}: trace {i} lacks {', '.join(missing)}; is it a `distill teacher generate` file?")

    groups: "OrderedDict[str, dict[int, dict]]" = OrderedDict()
    for t in traces:  # the last copy of a (prompt, sample) wins; duplicates only come from manual edits
        groups.setdefault(str(t["prompt_id"]), {})[int(t["sample"])] = t

    kept, per_prompt = [], OrderedDict()
    totals = {"traces": 0, "correct": 0, "format_ok": 0, "passing": 0, "kept": 0}
    rationalized = {"traces": 0, "passing": 0}
    solved = {"sampling": 0, "rationalization": 0}
    for pid, samples in groups.items():
        scored, hinted = [], []
        for s in sorted(samples):
            t = samples[s]
            pred = extract_answer(t["completion"])
            acc = verify(t["completion"], t["gold"]) if verify is not None else answers_match(pred, t["gold"])
            fmt = format_ok(t["completion"])
            passing = acc and (fmt or not require_format)
            (hinted if t.get("rationalized") else scored).append((t, acc, fmt, pred, passing))
        passing = [x for x in scored if x[4]]
        rationales = [x for x in hinted if x[4]]
        rationalized["traces"] += len(hinted)
        rationalized["passing"] += len(rationales)
        solved_by = "sampling" if passing else "rationalization" if rationales else None
        if solved_by:
            solved[solved_by] += 1
        if not passing and keep != "all":
            passing = rationales  # STaR: the hinted traces that reached the answer stand in for samples
        if keep == "all":
            chosen = scored
        elif keep == "all-correct":
            chosen = passing
        elif keep == "first-correct":
            chosen = passing[:1]
        else:  # best
            chosen = sorted(passing, key=lambda x: (-x[2], -(x[0].get("mean_logprob") or float("-inf")),
                                                    x[0]["sample"]))[:1]
        if keep == "all" and not any(x[4] for x in scored):
            chosen = chosen + rationales
        kept += [_kept_record(t, acc, fmt, pred) for t, acc, fmt, pred, _ in chosen]
        row = {"samples": len(scored), "correct": sum(x[1] for x in scored), "format_ok": sum(x[2] for x in scored),
               "passing": sum(x[4] for x in scored), "kept": len(chosen)}
        if hinted:
            row.update(rationalized=len(hinted), rationalized_passing=len(rationales), solved_by=solved_by)
        per_prompt[pid] = row
        for key in totals:
            totals[key] += row["samples" if key == "traces" else key]

    prompts = len(groups)
    with_kept = sum(1 for r in per_prompt.values() if r["kept"])
    with_correct = sum(1 for r in per_prompt.values() if r["correct"])
    report = {
        "in": str(in_path), "out": str(out_path), "keep": keep, "require_format": require_format,
        "prompts": prompts, **totals,
        "prompts_with_correct": with_correct, "prompts_kept": with_kept,
        "solved_by_sampling": solved["sampling"], "solved_by_rationalization": solved["rationalization"],
        "rationalized_traces": rationalized["traces"], "rationalized_passing": rationalized["passing"],
        "accuracy": totals["correct"] / totals["traces"],
        "format_rate": totals["format_ok"] / totals["traces"],
        "trace_yield": totals["kept"] / totals["traces"],
        "prompt_yield": with_kept / prompts,
        "per_prompt": per_prompt,
    }
    atomic_write_jsonl(out_path, kept)
    atomic_write_json(report_path(out_path), report)
    if echo is not None:
        for line in format_report(report):
            echo(line)
    return report


def format_report(report: dict, max_rows: int = 20) -> list[str]:
    """Human-readable yield report: per-prompt table (first `max_rows`) and the overall line."""
    lines = [f"{'prompt':<28} {'samples':>7} {'correct':>7} {'format':>7} {'kept':>5}"]
    rows = list(report["per_prompt"].items())
    for pid, r in rows[:max_rows]:
        lines.append(f"{pid[:28]:<28} {r['samples']:>7} {r['correct']:>7} {r['format_ok']:>7} {r['kept']:>5}")
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more prompts in {report_path(report['out'])}")
    lines.append(
        f"kept {report['kept']}/{report['traces']} traces ({report['trace_yield']:.1%}) for "
        f"{report['prompts_kept']}/{report['prompts']} prompts ({report['prompt_yield']:.1%}); "
        f"accuracy {report['accuracy']:.1%}, format {report['format_rate']:.1%} [keep={report['keep']}, "
        f"require_format={report['require_format']}] -> {report['out']}")
    if report.get("rationalized_traces"):
        lines.append(f"solved by sampling: {report['solved_by_sampling']}, by STaR rationalization: "
                     f"{report['solved_by_rationalization']} ({report['rationalized_passing']}/"
                     f"{report['rationalized_traces']} hinted traces reached the answer)")
    return lines
