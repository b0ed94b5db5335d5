"""GRPO on the student (DeepSeek-R1's RL stage), run by TRL's `GRPOTrainer`: `distill rl`.

We write no RL of our own. This module only connects TRL to the rest of distill:

* the start: a training run (`distill train`, `distill run`'s train/ or an on-policy round's; its NF4
  base and LoRA settings, its final adapters continued) or an exported / plain student directory
  (loaded in `--quant`, fresh LoRA adapters);
* the problems: any `load_problems` spec, prompted exactly as trace generation prompts the teacher
  (`format_prompt` with the same system prompt), so the student is asked what it learnt to answer;
* the rewards: our verifiers (`teachers.verify`), the answer's correctness and the <think> format,
  weighted `1` and `--format-weight`;
* the output: a run directory as `distill train` writes it (run.json with the student spec,
  metrics.jsonl with TRL's logged rewards per step, final/ with adapters + tokenizer + summary.json),
  so `distill export` and `distill bench` take it like any other.

TRL is an optional extra: `pip install 'distill[rl]'`; without it `distill rl` says so in one line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from distill.errors import DistillError
from distill.io import atomic_write_json
from distill.models.quant import QUANT_CHOICES
from distill.options import option, plain_dict, validate


@dataclass
class RLConfig:
    """`distill rl` (declared once)."""

    start: str = option(help="A training run directory (its final adapters are continued) or an exported / plain "
                             "student model directory (fresh LoRA adapters).", argument=True)
    out: Path = option(help="Run directory (run.json, metrics.jsonl, final/): `distill export` and `distill bench` take it.")
    data: str = option("synthetic:64", "Problems: synthetic[:N[:SEED[:MIN-MAX]]], gsm8k[:SPLIT], a JSONL file or a folder.")
    split: str = option("train", "Split read from a data folder or the hub.")
    limit: int | None = option(None, "Use only the first N problems.", minimum=1)
    system_prompt: str | None = option(None, "System prompt (default: the one trace generation uses; '' for none).")
    steps: int = option(50, "Optimizer steps.", minimum=1)
    lr: float = option(1e-5, "Learning rate of the adapters.", exclusive_minimum=0)
    num_generations: int = option(4, "Completions per prompt (the group whose rewards are compared).", minimum=2)
    prompts_per_step: int = option(2, "Prompts per optimizer step (each with --num-generations completions).", minimum=1)
    max_new_tokens: int = option(256, "Longest completion in tokens.", minimum=1)
    temperature: float = option(1.0, "Sampling temperature of the completions.", exclusive_minimum=0)
    beta: float = option(0.0, "KL penalty to the starting policy (0: none, and no reference model in memory).", minimum=0)
    format_weight: float = option(0.5, "Weight of the format reward (the accuracy reward weighs 1).", minimum=0)
    quant: str = option("nf4", "Base weights of a student started from a model directory (a run keeps its own).",
                        choices=QUANT_CHOICES)
    lora_r: int = option(16, "LoRA rank of fresh adapters (a run keeps its own).", minimum=1)
    lora_alpha: int = option(32, "LoRA alpha of fresh adapters.", exclusive_minimum=0)
    seed: int = option(0, "Seed of the data order, the sampling and fresh adapters.")
    save_every: int = option(0, "Checkpoint every N steps for --resume (0: only the final adapters).", minimum=0)
    resume: bool = option(False, "Continue the run in --out from its last checkpoint.")
    progress: bool = option(True, "Show a progress bar.")

    def to_dict(self) -> dict:
        return plain_dict(self)


def require_trl():
    try:
        import trl  # noqa: F401
    except ImportError:
        raise DistillError("distill rl needs TRL: pip install 'distill[rl]' (or pip install trl)") from None
    return trl


def start_spec(cfg: RLConfig):
    """(StudentSpec, adapter dir or None, what the start was) for `cfg.start`."""
    from students.model import LoraSettings, StudentSpec

    start = Path(cfg.start)
    if (start / "run.json").is_file():
        from students.export import adapter_dir_of, read_run

        run = read_run(start)
        spec = StudentSpec.from_dict(run["student"])
        spec.gradient_checkpointing = False  # completions are short; generation needs the KV cache
        return spec, adapter_dir_of(start), {"kind": "run", "path": str(start.resolve())}
    if (start / "config.json").is_file():
        if (start / "adapter_config.json").is_file():
            raise DistillError(f"{start} is an adapter directory; pass the run directory above it")
        return (StudentSpec(path=str(start.resolve()), quant=cfg.quant, lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha,
                                                                                          dropout=0.0),
                            gradient_checkpointing=False),
                None, {"kind": "model", "path": str(start.resolve())})
    raise DistillError(f"start {start} is neither a training run (run.json) nor a model directory (config.json)")


def rewards(verify: Callable[[str, str], bool] | None = None) -> list[Callable]:
    """Our verifiers as TRL reward functions: `(completions, gold, **columns) -> [float]`."""
    from teachers.verify import format_ok, is_correct

    check = verify or is_correct

    def accuracy_reward(completions, gold, **_):
        return [float(check(c, g)) for c, g in zip(completions, gold)]

    def format_reward(completions, **_):
        return [float(format_ok(c)) for c in completions]

    return [accuracy_reward, format_reward]


def train_rl(cfg: RLConfig, *, verify: Callable[[str, str], bool] | None = None) -> dict:
    """Run GRPO as `cfg` says; returns the summary (also final/summary.json).

    `verify(completion, gold) -> bool` replaces the accuracy check (default: `teachers.verify`)."""
    validate(cfg)
    require_trl()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from distill.data.gsm8k import gold_answer
    from distill.data.problems import load_problems
    from distill.models.sampling import DEFAULT_SYSTEM_PROMPT, format_prompt
    from students.model import count_parameters, load_student

    out = Path(cfg.out)
    if (out / "run.json").is_file() and not cfg.resume:
        raise DistillError(f"{out} holds a run already; pass --resume to continue it or choose a new --out")
    spec, adapter, start = start_spec(cfg)
    problems = load_problems(cfg.data, split=cfg.split, limit=cfg.limit)
    cuda = torch.cuda.is_available()
    model, tokenizer = load_student(spec, device="cuda" if cuda else "cpu", adapter_dir=adapter, trainable=True)
    model.config.use_cache = True
    tokenizer.padding_side = "left"
    system = DEFAULT_SYSTEM_PROMPT if cfg.system_prompt is None else cfg.system_prompt
    dataset = Dataset.from_list([{"prompt": format_prompt(tokenizer, p["question"], system),
                                  "gold": gold_answer(p["answer"]), "id": str(p["id"])} for p in problems])
    out.mkdir(parents=True, exist_ok=True)
    run_record = {"config": cfg.to_dict(), "student": spec.to_dict(), "start": start, "kind": "grpo",
                  "rewards": {"accuracy": 1.0, "format": cfg.format_weight}, "system_prompt": system}
    atomic_write_json(out / "run.json", run_record, indent=1, sort_keys=True)
    args = GRPOConfig(
        output_dir=str(out / "trl"), max_steps=cfg.steps, learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations, gradient_accumulation_steps=1,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
        beta=cfg.beta, reward_weights=[1.0, cfg.format_weight], seed=cfg.seed, logging_steps=1, report_to=[],
        save_strategy="steps" if cfg.save_every else "no", save_steps=cfg.save_every or 500, use_cpu=not cuda,
        bf16=cuda, gradient_checkpointing=False, remove_unused_columns=False, disable_tqdm=not cfg.progress,
        lr_scheduler_type="constant", warmup_steps=0)
    metrics_path = out / "metrics.jsonl"

    class _Log(TrainerCallback):
        """TRL's logged figures (rewards per function, their spread, KL, loss) as metrics.jsonl lines."""

        def on_log(self, _args, state, _control, logs=None, **_kw):
            if logs and state.is_world_process_zero:
                with open(metrics_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"kind": "train", "step": state.global_step, **logs}) + "\n")

    trainer = GRPOTrainer(model=model, reward_funcs=rewards(verify), args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[_Log()])
    resume = cfg.resume and any((out / "trl").glob("checkpoint-*"))
    if not resume:
        metrics_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    logged = read_rewards(out)
    summary = {"steps": trainer.state.global_step, "start": start, "run_dir": str(out), "final_dir": str(out / "final"),
               "reward_first": logged[0]["reward"] if logged else None,
               "reward_last": logged[-1]["reward"] if logged else None,
               "train_seconds_this_session": round(time.perf_counter() - t0, 1), "parameters": count_parameters(model)}
    if trainer.is_world_process_zero():
        final = out / "final"
        model.save_pretrained(str(final), safe_serialization=True)
        tokenizer.save_pretrained(str(final))
        atomic_write_json(final / "summary.json", summary, indent=1, sort_keys=True)
    return summary


def read_rewards(run_dir: str | Path) -> list[dict]:
    """The per-step reward lines of a GRPO run: {"step", "reward", "accuracy", "format"} (the means)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "reward" in rec:
            rows.append({"step": rec["step"], "reward": rec["reward"],
                         "accuracy": rec.get("rewards/accuracy_reward/mean"),
                         "format": rec.get("rewards/format_reward/mean")})
    return rows
