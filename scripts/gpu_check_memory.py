"""GPU check of the memory planner: measured torch.cuda.max_memory_allocated of a real QLoRA KD step
against `distill plan`, for a Qwen2.5-1.5B-shaped and a Qwen2.5-7B-shaped student.

One prepared script for a lent GPU (it needs CUDA and bitsandbytes; nothing from the hub):
  1. build the student from its config with random bf16 weights ON the GPU (fast init), save it;
  2. load it the way `distill train` does (students.model.load_student: real NF4 with double
     quantization, prepare_model_for_kbit_training, LoRA r=16 on all linear layers);
  3. run two KD steps at context 4096 (one padded sequence, top-32 cache batch, the project's
     chunked loss through students.train.batch_loss_sums, bf16 autocast, paged 8-bit AdamW) and read
     torch.cuda.max_memory_allocated over the second one (reset after the first);
  4. print and write JSON: measured vs the plan. The plan's optimizer states (paged 8-bit AdamW)
     live in CUDA unified memory, outside torch's allocator, so they are left out of the compared
     total (both figures are reported).

    python scripts/gpu_check_memory.py [--shapes qwen2.5-1.5b,qwen2.5-7b] [--context 4096] [--out DIR]
    python scripts/gpu_check_memory.py --dry-run      # CPU smoke test of this script on a tiny shape

Budget on an H200: about 4 minutes (the 7B save/load dominates). Not run in the session that wrote
it (no GPU was lent); docs/memory.md says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # Qwen2.5-1.5B and Qwen2.5-7B config.json values (text part)
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
}


def build_student(name: str, directory: Path, device: str) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))  # the tiny test models
    from helpers import tiny_tokenizer

    config = Qwen2Config(**SHAPES[name], max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         bos_token_id=None, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="50GB")
    tiny_tokenizer().save_pretrained(directory)  # ids are drawn below; the tokenizer only has to load
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return directory


def measure(student: Path, *, context: int, checkpointing: bool, lora_r: int, top_k: int, device: str) -> dict:
    import torch

    from distill.losses import combine_loss
    from students.model import LoraSettings, StudentSpec, load_student
    from students.train import TrainConfig, batch_loss_sums, loss_config, make_optimizer

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    spec = StudentSpec(path=str(student), quant="nf4", gradient_checkpointing=checkpointing, checkpoint_layers="all",
                       lora=LoraSettings(r=lora_r, alpha=2 * lora_r, dropout=0.05))
    model, _ = load_student(spec, device=torch.device(device))
    vocab = int(model.config.vocab_size)
    cfg = TrainConfig(student=str(student), cache="", out="", optimizer="auto", loss_chunk_size=512)
    lcfg = loss_config(cfg, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, opt_kind = make_optimizer(params, cfg, torch.device(device))
    T = context
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (1, T), generator=g)
    mask = torch.ones(1, T, dtype=torch.long)
    mask[0, -1] = 0  # one pad position: the batch carries a mask, as real (padded) batches do
    targets = torch.full((1, T), -100)
    targets[0, : T - 2] = ids[0, 1: T - 1]
    topk_ids = torch.randint(0, vocab, (1, T, top_k), generator=g)
    topk_lp = torch.log_softmax(torch.randn(1, T, top_k + 1, generator=g), -1)[..., :top_k].sort(-1, descending=True).values
    batch = {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, targets=targets, topk_ids=topk_ids,
                                              topk_logprobs=topk_lp).items()}
    n_valid = int((targets != -100).sum())
    model.train()
    weights = (torch.cuda.memory_allocated() - before) if cuda else None
    times = []
    for step in range(2):
        if cuda:
            torch.cuda.synchronize()
            if step == 1:
                resident = torch.cuda.memory_allocated() - before
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
            sums = batch_loss_sums(model, batch, lcfg)
        combine_loss(sums, n_valid, lcfg).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(round(time.perf_counter() - t0, 3))
        del sums
    out = {"optimizer": opt_kind, "step_seconds": times}
    if cuda:
        out.update(weights_and_adapters=weights, resident_before_step2=resident,
                   peak_step2=torch.cuda.max_memory_allocated() - before,
                   reserved=torch.cuda.max_memory_reserved())
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="qwen2.5-1.5b,qwen2.5-7b")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--no-ckpt-too", action="store_true", help="also measure without gradient checkpointing")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dry-run", action="store_true", help="CPU smoke test on a tiny shape (no measurement)")
    args = ap.parse_args(argv)
    import torch

    from distill.plan import ModelShape, format_bytes, plan_training

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU (use --dry-run for a CPU smoke test)")
    shapes = ["tiny"] if args.dry_run else args.shapes.split(",")
    context = 64 if args.dry_run else args.context
    report = {"script": "gpu_check_memory", "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "context": context, "lora_r": args.lora_r, "cases": []}
    for name in shapes:
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
            t0 = time.perf_counter()
            student = build_student(name, Path(tmp) / name, device)
            built = round(time.perf_counter() - t0, 1)
            for ckpt in ([True, False] if args.no_ckpt_too else [True]):
                res = measure(student, context=context, checkpointing=ckpt, lora_r=args.lora_r, top_k=args.top_k, device=device)
                plan = plan_training(ModelShape.from_config({"model_type": "qwen2", **SHAPES[name]}), quant="nf4",
                                     lora_r=args.lora_r, context=context, batch_tokens=context, optimizer=res["optimizer"],
                                     gradient_checkpointing=ckpt, compute="bf16", loss_chunk=512, top_k=args.top_k,
                                     lora_dropout=0.05, padded=True)
                paged = plan.part("optimizer states") if res["optimizer"] == "paged-adamw-8bit" else 0
                case = {"shape": name, "gradient_checkpointing": ckpt, "build_seconds": built, "measured": res,
                        "plan": plan.to_dict(), "plan_compared": plan.total - paged}
                if "peak_step2" in res:
                    case["plan_over_measured"] = round(case["plan_compared"] / res["peak_step2"], 3)
                    print(f"{name} ckpt={ckpt}: plan {format_bytes(case['plan_compared'])} vs measured "
                          f"{format_bytes(res['peak_step2'])} ({100 * (case['plan_over_measured'] - 1):+.1f}%)", flush=True)
                report["cases"].append(case)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check_memory.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({c["shape"] + ("" if c["gradient_checkpointing"] else "-no-ckpt"): c.get("plan_over_measured")
                      for c in report["cases"]}))
    return report


if __name__ == "__main__":
    main()
