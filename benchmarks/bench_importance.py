"""Layer importance scoring (`student init --keep-layers importance:N`): replayed vs whole forwards.

The whole-forward path runs the model once per candidate layer removed (30 candidates + 1 reference
for SmolLM2-135M); the replayed path records each layer's output once and, per candidate i, replays
layers < i and computes only layers > i, with the output head on the scored positions only. Both run
in this process on the same calibration batches, one thread, alternating, and report process CPU
time; the scores of the two must agree (largest relative difference) and choose the same layers.

Calibration: the demo's size, the first `--samples` GSM8K train problems (question -> worked answer)
cut to `--max-length` tokens (default 3 x 192), or synthetic problems when GSM8K is not at hand.

    python benchmarks/bench_importance.py [--samples 3 --max-length 192 --keep 15 --repeats 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = HERE / "results"
NAME = "bench_importance"
QUICK_ARGS = ["--samples", "1", "--max-length", "48", "--keep", "28"]
GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")


def calibration_file(work: Path, samples: int) -> Path:
    if GSM8K.is_file():
        rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:samples]]
        rows = [{"prompt": r["question"], "completion": r["answer"]} for r in rows]
    else:
        from distill.data.problems import load_problems

        rows = [{"prompt": p["question"], "completion": p["answer"]} for p in load_problems(f"synthetic:{samples}:0")]
    path = work / "calibration.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--keep", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each path (alternating)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-dir", default=None, help="a plain SmolLM2 directory (default: import the GGUF)")
    ap.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.json")
    args = ap.parse_args(argv)
    import torch

    from distill.models import load_model, load_tokenizer
    from students.init_student import calibration_batches, importance_keep

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_importance_") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from teachers.gguf_import import import_gguf, smollm2_gguf_path

            model_dir = str(Path(tmp) / "smollm2")
            import_gguf(smollm2_gguf_path(), model_dir)
        tok = load_tokenizer(model_dir, what="teacher")
        model = load_model(model_dir, what="teacher", device="cpu", dtype=torch.float32).eval()
        batches = calibration_batches(tok, calibration_file(Path(tmp), args.samples), args.samples, args.max_length)
        layers = model.model.layers
        cpu = {"whole": [], "replayed": []}
        wall = {"whole": [], "replayed": []}
        results = {}
        for r in range(args.repeats):
            for path in (("whole", "replayed") if r % 2 == 0 else ("replayed", "whole")):
                c0, t0 = time.process_time(), time.perf_counter()
                results[path] = importance_keep(model, layers, batches, args.keep, replay=path == "replayed")
                cpu[path].append(time.process_time() - c0)
                wall[path].append(time.perf_counter() - t0)
    fast, slow = results["replayed"], results["whole"]
    rel = max(abs(fast[1]["scores"][0][k] - v) / max(abs(v), 1e-12) for k, v in slow[1]["scores"][0].items())
    tokens = sum(int(a.sum()) for _, a, _ in batches)
    report = {
        "benchmark": NAME, "threads": torch.get_num_threads(), "model": "SmolLM2-135M-Instruct fp32 (30 layers)",
        "calibration": f"{args.samples} records, <= {args.max_length} tokens ({tokens} tokens)", "keep": args.keep,
        "cpu_s": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
        "wall_s": {k: [round(x, 2) for x in v] for k, v in wall.items()},
        "speedup_cpu": round(min(cpu["whole"]) / min(cpu["replayed"]), 3),
        "speedup_wall": round(min(wall["whole"]) / min(wall["replayed"]), 3),
        "max_relative_score_difference": rel, "same_layers": fast[0] == slow[0], "kept": fast[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{NAME}: whole {min(cpu['whole']):.1f} s CPU, replayed {min(cpu['replayed']):.1f} s CPU: "
          f"x{report['speedup_cpu']} (wall x{report['speedup_wall']}); scores agree to {rel:.1e}, same layers: {report['same_layers']}")
    return report


if __name__ == "__main__":
    main()
