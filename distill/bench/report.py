"""Write the benchmark's outputs: results.json, results.md (Markdown table), PNG plots, a summary.

The Markdown table and the plots are rendered from the results dict alone (never from intermediate
state), so they always agree with results.json; tests parse the table back and compare.
"""

from __future__ import annotations

import os
from pathlib import Path

from distill.io import atomic_write_json, atomic_write_text

RULE_LABELS = {
    "greedy": "greedy",
    "pass@n": "pass@{n}",
    "majority": "maj@{n}",
    "best-of-n": "best-of-{n}",
    "weighted-best-of-n": "weighted@{n}",
}


def rule_label(rule: str, n: int) -> str:
    return RULE_LABELS.get(rule, rule).format(n=n)


def _pct(entry: dict | None) -> str:
    if not entry:
        return "-"
    lo, hi = entry["ci95"]
    return f"{100 * entry['acc']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _human_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _human_count(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table_columns(results: dict) -> list[str]:
    n = results["settings"]["samples"]
    cols = ["model", "quant", "params", "size"]
    cols += [rule_label(r, n) for r in results["settings"]["rules"]]
    if any(m.get("agreement") for m in results["models"]):
        cols += ["KL", "top-1 agree", "ECE"]
    cols += ["tok/s", "peak mem"]
    return cols


def markdown_table(results: dict) -> str:
    """One row per model: accuracies (with 95% Wilson intervals) at N, agreement, cost."""
    cols = table_columns(results)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    has_agreement = "KL" in cols
    for m in results["models"]:
        cost = m["cost"]
        row = [m["name"], cost.get("quantization") or "-", _human_count(cost.get("parameters")),
               _human_bytes(cost.get("size_on_disk_bytes"))]
        row += [_pct(m["accuracy"].get(r)) for r in results["settings"]["rules"]]
        if has_agreement:
            ag = m.get("agreement") or {}
            if "error" in ag:
                row += ["n/a", "n/a", "n/a"]
            else:
                row += [_num(ag.get("kl"), ".4f"),
                        "-" if ag.get("top1_agreement") is None else f"{100 * ag['top1_agreement']:.1f}%",
                        _num(ag.get("ece"), ".4f")]
        row += [_num(cost.get("tokens_per_s"), ".1f"), _human_bytes(cost.get("peak_memory_bytes"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    s = results["settings"]
    task = results["task"]
    head = [
        f"# distill bench: {task['task']} ({task['num_problems']} problems)",
        "",
        f"N = {s['samples']} samples per problem at temperature {s['temperature']}, top-p {s['top_p']}; "
        f"greedy is a separate temperature-0 completion. Scorer for best-of-N: {s['scorer']}. "
        "Accuracies show the 95% Wilson interval in brackets. pass@N is an oracle upper bound "
        "(any sample correct). ",
        "",
        markdown_table(results),
        "",
    ]
    notes = []
    for m in results["models"]:
        ag = m.get("agreement") or {}
        if "error" in ag:
            notes.append(f"- {m['name']}: no held-out agreement: {ag['error']}")
    if any(m.get("agreement") and "error" not in m["agreement"] for m in results["models"]):
        notes.append("- KL: forward KL(teacher || model) over the cached top-k plus tail bucket, per token; "
                     "top-1 agree: model's argmax equals the teacher's; ECE: model's top-1 probability vs "
                     "whether its argmax equals the teacher's top-1 (10 bins).")
    notes.append(f"- peak mem: {results['models'][0]['cost'].get('peak_memory_kind', '')}; "
                 "tok/s: generated tokens per second over all batched generation (greedy and sampled).")
    notes.append(f"- wall time {results['wall_seconds']:.1f} s on {results['environment']['device']}.")
    return "\n".join(head + notes) + "\n"


def plot_accuracy_vs_n(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = results["grid"]
    styles = ["-o", "--s", ":^", "-.d"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for mi, m in enumerate(results["models"]):
        color = colors[mi % len(colors)]
        for ri, rule in enumerate(r for r in results["settings"]["rules"] if r != "greedy"):
            curve = m["curves"].get(rule)
            if not curve:
                continue
            ys = [curve[str(n)]["acc"] for n in grid]
            lo = [max(0.0, curve[str(n)]["acc"] - curve[str(n)]["ci95"][0]) for n in grid]
            hi = [max(0.0, curve[str(n)]["ci95"][1] - curve[str(n)]["acc"]) for n in grid]
            # small horizontal offsets so that overlapping curves and error bars stay distinguishable
            xs = [n * 2 ** (0.04 * (ri - 1.5) + 0.015 * mi) for n in grid]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=styles[ri % len(styles)], color=color, capsize=3,
                        alpha=0.85, label=f"{m['name']} {RULE_LABELS[rule].format(n='N')}")
        if "greedy" in m["accuracy"]:
            ax.axhline(m["accuracy"]["greedy"]["acc"], color=color, linewidth=1, linestyle=(0, (1, 3)),
                       label=f"{m['name']} greedy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(grid)
    ax.set_xticklabels([str(n) for n in grid])
    ax.set_xlabel("samples per problem (N)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{results['task']['task']}: accuracy vs N (95% Wilson)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_size(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    n = results["settings"]["samples"]
    best_rule = next((r for r in ("majority", "weighted-best-of-n", "best-of-n")
                      if r in results["settings"]["rules"]), None)
    for m in results["models"]:
        size = m["cost"].get("size_on_disk_bytes")
        if not size:
            continue
        x = size / 2**20
        for rule, marker in (("greedy", "o"), (best_rule, "s")):
            entry = m["accuracy"].get(rule) if rule else None
            if not entry:
                continue
            lo, hi = entry["ci95"]
            ax.errorbar([x], [entry["acc"]], yerr=[[max(0.0, entry["acc"] - lo)], [max(0.0, hi - entry["acc"])]], fmt=marker,
                        capsize=3, label=f"{m['name']} {rule_label(rule, n)}")
        ax.annotate(m["name"], (x, m["accuracy"].get("greedy", {}).get("acc", 0.0)), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("accuracy vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: str | Path) -> dict:
    """Write results.json, results.md and the plots into `out`; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": out / "results.json",
        "markdown": out / "results.md",
        "accuracy_vs_n": out / "accuracy_vs_n.png",
        "accuracy_vs_size": out / "accuracy_vs_size.png",
    }
    for key, fn in (("accuracy_vs_n", plot_accuracy_vs_n), ("accuracy_vs_size", plot_accuracy_vs_size)):
        tmp = paths[key].with_name(f".{paths[key].name}.tmp.png")
        fn(results, tmp)
        os.replace(tmp, paths[key])
    atomic_write_text(paths["markdown"], markdown_report(results))
    atomic_write_json(paths["results"], results)
    return {k: str(v) for k, v in paths.items()}


def terminal_summary(results: dict, paths: dict | None = None) -> str:
    lines = [markdown_table(results), "",
             f"{results['task']['task']}: {results['task']['num_problems']} problems, N={results['settings']['samples']}, "
             f"wall {results['wall_seconds']:.1f} s"]
    if paths:
        lines.append("wrote " + ", ".join(paths.values()))
    return "\n".join(lines)
