"""The memory planner (distill/plan.py) against the measured peak of real CPU training steps.

Each case runs in a fresh subprocess: load the student (NF4 + LoRA, as `distill train` does), build a
padded cache-shaped batch, run two optimizer steps through the trainer's own loss path
(`students.train.batch_loss_sums` + `combine_loss`, AdamW), and read the peak resident set size
of the second step (VmHWM, reset through /proc/self/clear_refs after the first step). The measured
total is that peak minus the resident size just before the model was loaded (all imports done).
glibc is told to serve every allocation above 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed
tensors leave the resident set at once and RSS tracks live tensor memory.

Cases: a random llama of SmolLM2-135M's shape with half its layers (the demo student) and smaller
random llamas; `--smollm2` adds the real SmolLM2 student (made with `distill student init` from the
packaged GGUF). Writes benchmarks/results/bench_plan.json.

    python benchmarks/bench_plan.py [--quick] [--smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "bench_plan"

# (name, hidden, layers, heads, kv_heads, intermediate, vocab, context, sequences, checkpointing)
CASES = [
    ("smollm2-shape-15L", 576, 15, 9, 3, 1536, 49152, 256, 4, False),
    ("smollm2-shape-15L-ckpt", 576, 15, 9, 3, 1536, 49152, 256, 4, True),
    ("mid-8L", 256, 8, 8, 4, 768, 16384, 256, 4, False),
]
QUICK = [("mid-8L", 256, 8, 8, 4, 768, 16384, 256, 4, False),
         ("mid-8L-ckpt", 256, 8, 8, 4, 768, 16384, 256, 4, True)]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def make_student(directory: Path, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> Path:
    """A random llama of this shape with the tiny test tokenizer (ids are drawn below its size)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))  # the tiny test models
    from helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def measure_step(student: str, *, context: int, sequences: int, lora_r: int = 16, quant: str = "nf4",
                 checkpointing: bool = False, top_k: int = 32, loss_chunk: int = 512, lora_dropout: float = 0.05) -> dict:
    """Run in a fresh process: the peak memory of a real training step, measured as the module docstring says."""
    import gc

    import torch

    from students.model import LoraSettings, StudentSpec, load_student

    torch.manual_seed(0)
    spec = StudentSpec(path=student, quant=quant, gradient_checkpointing=checkpointing,
                       lora=LoraSettings(r=lora_r, alpha=2 * lora_r, dropout=lora_dropout))
    # Warm-up: one short step of the same student loads every library, kernel and thread pool the
    # measured steps use, so that the baseline below holds everything but the run's tensors.
    _steps(*load_student(spec, device="cpu"), context=8, sequences=1, top_k=top_k, loss_chunk=loss_chunk, n=1)
    gc.collect()
    rss0 = _status_kib("VmRSS") * 1024
    model, tok = load_student(spec, device="cpu")
    gc.collect()
    rss_loaded = _status_kib("VmRSS") * 1024
    times, rss_before = _steps(model, tok, context=context, sequences=sequences, top_k=top_k, loss_chunk=loss_chunk, n=2)
    peak = _status_kib("VmHWM") * 1024
    return {"rss_before_load": rss0, "weights_and_adapters": rss_loaded - rss0, "resident_before_step2": rss_before - rss0,
            "peak_total": peak - rss0, "step2_growth": peak - rss_before, "step_seconds": times}


def _steps(model, tok, *, context: int, sequences: int, top_k: int, loss_chunk: int, n: int):
    """`n` optimizer steps on a padded random batch; the peak-RSS mark is reset before the last one."""
    import gc

    import torch

    from distill.losses import combine_loss
    from students.train import TrainConfig, batch_loss_sums, loss_config

    vocab = int(model.config.vocab_size)
    cfg = TrainConfig(student="", cache="", out="", loss_chunk_size=loss_chunk)
    lcfg = loss_config(cfg, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    B, T = sequences, context
    lengths = [T] * (B - 1) + [T - 1]  # one shorter sample: the batch carries a padding mask, as real ones do
    ids = torch.randint(5, vocab, (B, T))
    mask = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), -100)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
        targets[i, : length - 1] = ids[i, 1:length]
    topk_ids = torch.randint(0, vocab, (B, T, top_k))
    topk_lp = torch.log_softmax(torch.randn(B, T, top_k + 1), -1)[..., :top_k].sort(-1, descending=True).values
    batch = {"input_ids": ids, "attention_mask": mask, "targets": targets, "target_ids": topk_ids, "target_logprobs": topk_lp}
    model.train()
    times, rss_before = [], 0
    for step in range(n):
        if step == n - 1:
            gc.collect()
            rss_before = _status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        t0 = time.perf_counter()
        sums = batch_loss_sums(model, batch, lcfg)
        loss = combine_loss(sums, int((targets != -100).sum()), lcfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(round(time.perf_counter() - t0, 2))
        del sums, loss
    return times, rss_before


def plan_for(student: str, *, context: int, sequences: int, lora_r: int = 16, quant: str = "nf4", checkpointing: bool = False,
             top_k: int = 32, loss_chunk: int = 512, lora_dropout: float = 0.05) -> dict:
    from distill.plan import load_shape, plan_training
    from students.model import DEFAULT_CHECKPOINT_LAYERS, checkpoint_policy

    # checkpointing on = the student's default policy, as measure_step runs it
    every, lean = checkpoint_policy(DEFAULT_CHECKPOINT_LAYERS)
    plan = plan_training(load_shape(student), quant=quant, lora_r=lora_r, context=context, batch_tokens=context * sequences,
                         optimizer="adamw", gradient_checkpointing=checkpointing, compute="fp32", loss_chunk=loss_chunk,
                         top_k=top_k, lora_dropout=lora_dropout, padded=True,
                         checkpoint_every=every, lean=lean)
    return plan.to_dict()


def run_case_subprocess(student: str, **kwargs) -> dict:
    """measure_step in a fresh interpreter (so that earlier allocations do not blur the peak)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps({"student": student, **kwargs})]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(student: str, **kwargs) -> dict:
    measured = run_case_subprocess(student, **kwargs)
    planned = plan_for(student, **kwargs)
    ratio = planned["total"] / measured["peak_total"]
    return {"settings": kwargs, "measured": measured, "plan": planned, "plan_over_measured": round(ratio, 3),
            "error_pct": round(100 * (ratio - 1), 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small cases only (a minute)")
    ap.add_argument("--smollm2", action="store_true", help="also the real SmolLM2 student (every second layer)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kw = json.loads(args.child)
        res = measure_step(kw.pop("student"), **kw)
        print(json.dumps(res))
        return res
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        for name, h, L, nh, nkv, inter, V, T, B, ckpt in (QUICK if args.quick else CASES):
            d = make_student(Path(tmp) / name, h, L, nh, nkv, inter, V)
            res = compare(str(d), context=T, sequences=B, checkpointing=ckpt)
            res["case"] = name
            results.append(res)
            print(f"{name}: plan {res['plan']['total'] / 2**20:.0f} MiB, measured {res['measured']['peak_total'] / 2**20:.0f} MiB "
                  f"({res['error_pct']:+.1f}%)", flush=True)
        if args.smollm2:
            from students.init_student import init_student
            from teachers.gguf_import import import_gguf, smollm2_gguf_path

            teacher = import_gguf(smollm2_gguf_path(), Path(tmp) / "smollm2")
            student = Path(tmp) / "smollm2-student"
            init_student(str(teacher), student, keep_layers="every:2")
            for ckpt in (False, True):
                res = compare(str(student), context=256, sequences=4, checkpointing=ckpt)
                res["case"] = "smollm2-student-15L" + ("-ckpt" if ckpt else "")
                results.append(res)
                print(f"{res['case']}: plan {res['plan']['total'] / 2**20:.0f} MiB, measured "
                      f"{res['measured']['peak_total'] / 2**20:.0f} MiB ({res['error_pct']:+.1f}%)", flush=True)
    report = {"benchmark": NAME, "device": "cpu", "method": "VmHWM of the 2nd step minus VmRSS before the model load",
              "cases": results, "max_abs_error_pct": max(abs(r["error_pct"]) for r in results)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
