"""GGUF export quality: f16 / q8_0 / q4_1 / q4_0 files against the fp32 model they were written from.

For each type, two readers of the same file: transformers (`gguf_file=`, dequantized to fp32) and,
when llama-cpp-python is installed (scripts/check_llamacpp.sh), the llama.cpp runtime itself. Each
is compared with the fp32 model on a few chat prompts: next-token KL and top-1 agreement over the
prompt plus the fp32 model's greedy continuation, the largest |log-prob difference| over the fp32
model's top-10 tokens, and (llama.cpp) whether both tokenizers give the same ids and whether the
greedy continuations are identical.

Model: the real SmolLM2-135M-Instruct (packaged GGUF, imported) when installed, else a tiny random
llama. Writes benchmarks/results/bench_gguf.json.

    python benchmarks/bench_gguf.py [--tiny] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "bench_gguf"
QUICK_ARGS = ["--tiny", "--new-tokens", "4"]
QUESTIONS = ["What is 7 times 8?", "Tom has 3 apples and buys 4 more. How many apples does he have?",
             "Name the capital of France.", "Write one sentence about the sea."]


def chat_prompts(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in QUESTIONS]


def transformers_vs_fp32(path: Path, refs) -> dict:
    """The file read back by transformers against the fp32 model, on prompt + fp32 greedy continuation."""
    import torch
    from transformers import AutoModelForCausalLM

    from students.export_gguf import agreement
    from students.gguf_check import hf_logprobs

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    rows = [agreement(ref_lp, hf_logprobs(loaded, ids + cont)) for ids, cont, ref_lp in refs]
    n = sum(r["positions"] for r in rows)
    return {"kl_mean": sum(r["kl_mean"] * r["positions"] for r in rows) / n, "kl_max": max(r["kl_max"] for r in rows),
            "top1": sum(r["top1"] * r["positions"] for r in rows) / n, "max_abs_logprob": max(r["max_abs_logprob"] for r in rows)}


def measure(model, tokenizer, workdir: Path, *, types=("f16", "q8_0", "q4_1", "q4_0"), new_tokens: int = 16,
            llamacpp: bool | None = None) -> dict:
    from students.export_gguf import write_gguf
    from students.gguf_check import reference

    if llamacpp is None:
        try:
            import llama_cpp  # noqa: F401

            llamacpp = True
        except ImportError:
            llamacpp = False
    prompts = chat_prompts(tokenizer)
    refs = reference(model, tokenizer, prompts, new_tokens)
    out = {}
    for kind in types:
        path = workdir / f"model-{kind}.gguf"
        t0 = time.perf_counter()
        summary = write_gguf(model, tokenizer, path, kind)
        entry = {"bytes": summary["bytes"], "write_seconds": round(time.perf_counter() - t0, 2),
                 "tensor_types": summary["tensor_types"],
                 "transformers": transformers_vs_fp32(path, refs)}
        if llamacpp:
            from students.gguf_check import compare

            res = compare(model, tokenizer, path, prompts, new_tokens=new_tokens, refs=refs)
            entry["llamacpp"] = {k: v for k, v in res.items() if k not in ("file",)}
        out[kind] = entry
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random llama instead of SmolLM2")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--types", default="f16,q8_0,q4_1,q4_0", help="comma-separated GGUF types")
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        tmp = Path(tmp)
        name = "tiny-llama"
        if not args.tiny:
            from teachers.gguf_import import smollm2_package_dir

            if smollm2_package_dir() is not None:
                from teachers.gguf_import import import_gguf, smollm2_gguf_path

                src = import_gguf(smollm2_gguf_path(), tmp / "smollm2")
                model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
                tokenizer = AutoTokenizer.from_pretrained(str(src))
                name = "SmolLM2-135M-Instruct"
        if name == "tiny-llama":
            import pathlib
            import sys

            sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))  # the tiny test models
            from helpers import tiny_llama, tiny_tokenizer

            tokenizer = tiny_tokenizer()
            model = tiny_llama(tokenizer, hidden_size=64)
        results = measure(model, tokenizer, tmp, types=tuple(args.types.split(",")), new_tokens=args.new_tokens)
    report = {"benchmark": NAME, "model": name, "new_tokens": args.new_tokens, "prompts": len(QUESTIONS), "types": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    for kind, r in results.items():
        t = r["transformers"]
        line = f"{kind}: {r['bytes'] / 2**20:.1f} MiB; transformers KL {t['kl_mean']:.2e} top-1 {t['top1']:.3f}"
        if "llamacpp" in r:
            c = r["llamacpp"]
            line += (f"; llama.cpp tokens equal {c['all_tokens_equal']}, greedy equal {c['all_greedy_equal']} "
                     f"({c['greedy_token_agreement']:.2f}), KL {c['kl_mean']:.2e}, max|dlogp| {c['max_abs_logprob']:.3f}")
        print(line)
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
