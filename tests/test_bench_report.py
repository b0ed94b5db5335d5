"""The report renders results.json faithfully: parse the Markdown table back and compare."""

from __future__ import annotations

import json
import re

from distill.bench.report import markdown_table, rule_label, terminal_summary, write_report
from distill.bench.stats import accuracy_entry

CELL = re.compile(r"^(?P<acc>\d+\.\d)% \[(?P<lo>\d+\.\d), (?P<hi>\d+\.\d)\]$")


def fake_results() -> dict:
    rules = ["greedy", "pass@n", "majority", "best-of-n", "weighted-best-of-n"]
    grid = [1, 2, 4]

    def model(name, base, size, agreement):
        curves = {r: {str(n): accuracy_entry(min(20, base + i + n), 20) for n in grid} for i, r in enumerate(rules[1:])}
        acc = {"greedy": accuracy_entry(base, 20)}
        acc.update({r: curves[r]["4"] for r in rules[1:]})
        return {
            "name": name, "path": f"/x/{name}", "source": "hf-dir", "base_path": None, "accuracy": acc,
            "curves": curves, "answer_parse_rate": 0.9, "agreement": agreement,
            "cost": {"parameters": 135_000_000, "size_on_disk_bytes": size, "quantization": "nf4",
                     "peak_memory_bytes": 2**30, "peak_memory_kind": "process_peak_rss", "tokens_per_s": 123.4,
                     "generated_tokens": 1000, "generation_seconds": 8.1, "load_seconds": 1.0, "batch_size": 8},
        }

    return {
        "version": 1,
        "task": {"task": "synthetic", "seed": 1, "num_problems": 20},
        "settings": {"samples": 4, "rules": rules, "scorer": "self", "temperature": 0.7, "top_p": 0.95},
        "grid": grid,
        "models": [
            model("teacher", 11, 500 * 2**20, {"kl": 0.0012, "top1_agreement": 0.998, "ece": 0.0213, "tokens": 100}),
            model("student", 3, 90 * 2**20, {"error": "cache was built with another tokenizer"}),
        ],
        "wall_seconds": 12.5,
        "environment": {"device": "CPU"},
    }


def parse_table(md: str) -> list[dict]:
    lines = [l for l in md.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells)))
    return rows


def test_markdown_numbers_agree_with_results(tmp_path):
    results = fake_results()
    paths = write_report(results, tmp_path)
    for key in ("results", "markdown", "accuracy_vs_n", "accuracy_vs_size"):
        assert (tmp_path / paths[key].split("/")[-1]).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = parse_table((tmp_path / "results.md").read_text())
    assert [r["model"] for r in rows] == ["teacher", "student"]
    for row, m in zip(rows, saved["models"]):
        for rule in saved["settings"]["rules"]:
            cell = CELL.match(row[rule_label(rule, saved["settings"]["samples"])])
            assert cell, row
            entry = m["accuracy"][rule]
            assert float(cell["acc"]) == round(100 * entry["acc"], 1)
            assert float(cell["lo"]) == round(100 * entry["ci95"][0], 1)
            assert float(cell["hi"]) == round(100 * entry["ci95"][1], 1)
        assert float(row["tok/s"]) == round(m["cost"]["tokens_per_s"], 1)
    assert float(rows[0]["KL"]) == round(saved["models"][0]["agreement"]["kl"], 4)
    assert rows[0]["top-1 agree"] == "99.8%"
    assert float(rows[0]["ECE"]) == round(saved["models"][0]["agreement"]["ece"], 4)
    assert rows[1]["KL"] == "n/a"
    assert "another tokenizer" in (tmp_path / "results.md").read_text()
    # the PNGs are real PNG files
    assert (tmp_path / "accuracy_vs_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "teacher" in terminal_summary(results, paths)


def test_no_agreement_columns_without_cache():
    results = fake_results()
    for m in results["models"]:
        m["agreement"] = None
    header = markdown_table(results).splitlines()[0]
    assert "KL" not in header and "maj@4" in header and "weighted@4" in header
