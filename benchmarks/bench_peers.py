"""`distill train` against its peers on the same student, data and batch: tokens per CPU-second, tokens/s, peak memory.

  distill           `distill train` (offline KD from a top-32 teacher cache), gradient checkpointing off
  distill_default   the same with the default checkpointing policy (`--checkpoint-layers`, recorded as "policy")
  distill_lean      the same with `--checkpoint-layers lean` (selective recomputation, no whole layer recomputed)
  trl_gkd           TRL's GKDTrainer, online KD (lmbda=0: the dataset's completions, beta=0: forward KL),
                    the teacher held in memory; skipped when TRL is not installed (`pip install
                    'distill[bench]'`: TRL is a benchmark extra, never a runtime dependency)
  bare_ce           a bare peft + bitsandbytes loop: model(input_ids, labels).loss, AdamW

Student: SmolLM2-135M-Instruct cut to every second layer, NF4 (double quant) + LoRA r=16 on every
linear layer, fp32 compute on a CPU; teacher: SmolLM2-135M-Instruct fp32. Data: synthetic problems
with their worked solutions as chat records (no generation needed), `--batch` records per step.
Each variant runs in its own process, one after another (not interleaved: each is a whole training
run), one torch thread each (`--threads`): over the steps after the first, non-padding tokens per
second of process CPU time (the robust figure on a shared machine: none of the variants starts
child processes, so the process's own CPU time is the whole cost; with one thread it is the time
the step would take on a free core) and per wall-clock second, and the peak RSS (VmHWM).

    python benchmarks/bench_peers.py [--records 64 --batch 4 --steps 12]
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = HERE / "results"
NAME = "bench_peers"
QUICK_ARGS = ["--records", "8", "--batch", "2", "--steps", "3", "--max-length", "128"]
VARIANTS = ("distill", "distill_default", "distill_lean", "trl_gkd", "bare_ce")


def _vmhwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def prepare(work: Path, records: int, max_length: int, model_dir: str | None) -> dict:
    from distill.io import atomic_write_jsonl
    from distill.models.sampling import DEFAULT_SYSTEM_PROMPT
    from students.init_student import init_student
    from teachers.cache_build import build_cache
    from distill.data.problems import load_problems

    if model_dir is None:
        from teachers.gguf_import import import_gguf, smollm2_gguf_path

        model_dir = str(work / "teacher")
        import_gguf(smollm2_gguf_path(), model_dir)
    student = work / "student"
    init_student(model_dir, student, keep_layers="every:2", overwrite=True)
    rows = [{"id": p["id"], "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                         {"role": "user", "content": p["question"]},
                                         {"role": "assistant", "content": p["answer"]}]}
            for p in load_problems(f"synthetic:{records}:0")]
    data = atomic_write_jsonl(work / "records.jsonl", rows)
    build_cache(model_dir, data, work / "cache", top_k=32, max_length=max_length, progress=False, log=lambda m: None)
    return {"teacher": model_dir, "student": str(student), "records": str(data), "cache": str(work / "cache")}


# ---- variants, each in its own process ----------------------------------------------------------

def run_distill(info: dict, args, policy: str) -> dict:
    import cli
    from students.train import read_metrics

    out = Path(info["work"]) / f"run-{policy}"
    argv = ["train", "--student", info["student"], "--cache", info["cache"], "--out", str(out), "--quant", "nf4",
            "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0", "--batch-size", str(args.batch),
            "--steps", str(args.steps), "--eval-every", "0", "--save-every", "0", "--warmup-steps", "1",
            "--eval-fraction", "0.05", "--no-progress"]
    argv += ["--no-gradient-checkpointing"] if policy == "none" else ["--gradient-checkpointing", "--checkpoint-layers", policy]
    try:
        cli.main(argv)
    except SystemExit as err:
        if err.code not in (0, None):
            raise RuntimeError(f"distill train exited with {err.code}") from None
    steps = [r for r in read_metrics(out) if r.get("kind") == "train"][1:]
    tokens = sum(r["tokens"] for r in steps)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in steps if r.get("tokens_per_s"))
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": sum(r["cpu_s"] for r in steps)}


def _tokenized(info: dict, tok, max_length: int) -> list[list[int]]:
    rows = [json.loads(line) for line in Path(info["records"]).read_text().splitlines()]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    return [tok(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]


def run_bare_ce(info: dict, args) -> dict:
    import torch

    from students.model import LoraSettings, StudentSpec, load_student

    model, tok = load_student(StudentSpec(info["student"], quant="nf4", gradient_checkpointing=False,
                                          lora=LoraSettings(r=16, alpha=32, dropout=0.0)), device="cpu")
    model.train()
    seqs = _tokenized(info, tok, args.max_length)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = seconds = cpu = 0.0
    for step in range(args.steps):
        batch = [seqs[(step * args.batch + i) % len(seqs)] for i in range(args.batch)]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, :len(s)], att[i, :len(s)] = torch.tensor(s), 1
        labels = ids.masked_fill(att == 0, -100)
        t0, c0 = time.perf_counter(), time.process_time()
        model(input_ids=ids, attention_mask=att, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            tokens, seconds = tokens + int(att.sum()), seconds + time.perf_counter() - t0
            cpu += time.process_time() - c0
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu}


def run_trl_gkd(info: dict, args) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        try:
            from trl import GKDConfig, GKDTrainer
        except ImportError:
            return {"skipped": "trl is not installed (pip install 'distill[bench]')"}
    import datasets
    import torch
    from transformers import TrainerCallback

    from distill.models import load_model
    from students.model import LoraSettings, StudentSpec, load_student

    model, tok = load_student(StudentSpec(info["student"], quant="nf4", gradient_checkpointing=False,
                                          lora=LoraSettings(r=16, alpha=32, dropout=0.0)), device="cpu")
    teacher = load_model(info["teacher"], what="teacher", device="cpu", dtype=torch.float32)
    rows = [json.loads(line) for line in Path(info["records"]).read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    mean_tokens = sum(len(s) for s in _tokenized(info, tok, args.max_length)) / len(rows)

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.cpu = [], []

        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    clock = Clock()
    cfg = GKDConfig(output_dir=str(Path(info["work"]) / "trl"), lmbda=0.0, beta=0.0, max_steps=args.steps,
                    per_device_train_batch_size=args.batch, learning_rate=1e-4, max_length=args.max_length,
                    logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
                    gradient_checkpointing=False, dataloader_num_workers=0, seed=0)
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[clock])
    trainer.train()
    steps = clock.times[1:]
    return {"tokens": mean_tokens * args.batch * len(steps), "seconds": sum(steps), "cpu_seconds": sum(clock.cpu[1:]),
            "tokens_note": "mean record length x batch (the trainer's own batches are not visible to a callback)"}


def child(variant: str, info: dict, args) -> dict:
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if variant == "distill":
        res = run_distill(info, args, "none") | {"policy": "none"}
    elif variant == "distill_default":
        from students.model import DEFAULT_CHECKPOINT_LAYERS

        res = run_distill(info, args, DEFAULT_CHECKPOINT_LAYERS) | {"policy": DEFAULT_CHECKPOINT_LAYERS}
    elif variant == "distill_lean":
        res = run_distill(info, args, "lean") | {"policy": "lean"}
    elif variant == "trl_gkd":
        res = run_trl_gkd(info, args)
    else:
        res = run_bare_ce(info, args)
    if "skipped" not in res:
        res["tokens_per_s"] = res["tokens"] / res["seconds"] if res["seconds"] > 0 else None
        res["tokens_per_cpu_s"] = res["tokens"] / res["cpu_seconds"] if res["cpu_seconds"] > 0 else None
        res["threads"] = torch.get_num_threads()
        res["peak_rss_mib"] = round(_vmhwm_mib(), 1)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per variant (0: torch's default)")
    ap.add_argument("--model-dir", default=None, help="a plain SmolLM2 directory (default: import the GGUF)")
    ap.add_argument("--only", action="append", default=None, choices=VARIANTS)
    ap.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-info", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = child(args.child, json.loads(args.child_info), args)
        print(json.dumps(res))
        return res

    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        info = prepare(Path(tmp), args.records, args.max_length, args.model_dir) | {"work": tmp}
        rows = {}
        for variant in args.only or VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, "--child-info", json.dumps(info),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--max-length", str(args.max_length)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if out.returncode != 0:
                rows[variant] = {"error": out.stderr.strip().splitlines()[-1:] or ["failed"]}
            else:
                rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {variant}: {rows[variant]}", file=sys.stderr, flush=True)
    base = rows.get("distill", {}).get("tokens_per_s")
    base_cpu = rows.get("distill", {}).get("tokens_per_cpu_s")
    for r in rows.values():
        if base and r.get("tokens_per_s"):
            r["speed_vs_distill"] = round(r["tokens_per_s"] / base, 3)
        if base_cpu and r.get("tokens_per_cpu_s"):
            r["cpu_speed_vs_distill"] = round(r["tokens_per_cpu_s"] / base_cpu, 3)
    report = {"benchmark": NAME, "batch": args.batch, "steps": args.steps, "max_length": args.max_length, "threads": args.threads,
              "records": args.records, "student": "SmolLM2-135M-Instruct every second layer, NF4 + LoRA r=16, fp32 compute",
              "variants": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{NAME}: " + "; ".join(f"{k}: {v.get('tokens_per_cpu_s') and round(v['tokens_per_cpu_s'], 1)} tok/CPU-s, "
                                  f"{v.get('tokens_per_s') and round(v['tokens_per_s'], 1)} tok/s wall, "
                                  f"{v.get('peak_rss_mib')} MiB" if "tokens_per_s" in v else f"{k}: {v}"
                                  for k, v in rows.items()))
    return report


if __name__ == "__main__":
    main()
