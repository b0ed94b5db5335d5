#!/usr/bin/env bash
# GRPO (DeepSeek-R1's RL stage) on a distilled student, on one GPU, with TRL's GRPOTrainer:
# pip install 'distill[rl]'. Continues the run of examples/gpu-r1-qwen.toml (its final NF4 + LoRA r=64
# adapters on DeepSeek-R1-Distill-Qwen-1.5B); rewards are our verifiers: the GSM8K answer (weight 1)
# and the <think> format (weight 0.25).
#
# Memory (estimates, 24 GB card): NF4 base 1.2 GB + LoRA/AdamW 0.9 GB; generation of 8 prompts x 8
# completions x up to 1,024 new tokens: KV cache 64 x 1,300 tokens x 28 layers x 2 x 4 x 128 x 2 B
# ~ 4.8 GB; the policy forward/backward over the same 64 sequences in micro-batches ~ 6-8 GB.
# beta = 0 (TRL's default): no reference model is held. With beta > 0 TRL keeps the starting policy
# as the reference (for a PEFT student: the base with adapters disabled).
set -euo pipefail
RUN=${RUN:-runs/r1-qwen-gsm8k}

distill rl "$RUN/train" --out "$RUN/grpo" \
  --data gsm8k --split train --limit 2000 \
  --steps 500 --prompts-per-step 8 --num-generations 8 \
  --max-new-tokens 1024 --temperature 0.9 --lr 1e-5 --beta 0.0 --format-weight 0.25 \
  --save-every 50   # rerun with --resume after an interruption

distill export "$RUN/grpo" --out "$RUN/grpo-export" --format merged --dtype bf16
distill bench --model "teacher=deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" --model "kd=$RUN/export" \
  --model "grpo=$RUN/grpo-export" --task gsm8k --limit 1319 --out "$RUN/grpo-bench"
