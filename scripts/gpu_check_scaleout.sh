#!/usr/bin/env bash
# The scale-out check for a GPU machine: train a Qwen2.5-1.5B-shaped random NF4 + LoRA student for a few
# steps as one process, as DDP (2+ GPUs), as FSDP-QLoRA and as DeepSpeed ZeRO-3 (when deepspeed is
# installed), with the configs in examples/accelerate/, and report for each: exit status, tokens/s, peak
# GPU memory and the held-out KL, as one JSON file. Run from the repository root:
#
#   bash scripts/gpu_check_scaleout.sh            # writes $OUT/gpu_check_scaleout.json (OUT default: benchmarks/results)
#
# Every run has a timeout (RUN_TIMEOUT seconds, default 240) and the whole script stays within ~9 minutes
# on one H200. The student is random (no download): shapes are what matter for memory and speed.
# Status: NOT RUN YET (no GPU has been lent to this project); the first run's JSON is the evidence.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}
STEPS=${STEPS:-3}
WORK=$(mktemp -d /tmp/scaleout.XXXXXX)
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then echo "no CUDA GPU: nothing to check" >&2; exit 2; fi

# 1. A Qwen2.5-1.5B-shaped student (28 layers, hidden 1536, GQA 12/2 heads, vocab 151,936) with a small
#    tokenizer, a tiny teacher sharing that tokenizer, and a teacher cache of 1,024-token samples.
$PY - "$WORK" <<'EOF' || { echo "setup failed" >&2; exit 1; }
import sys, torch
from pathlib import Path
from transformers import Qwen2Config, Qwen2ForCausalLM
sys.path.insert(0, 'tests')  # the tiny test models (run from the repository root)
from helpers import tiny_tokenizer
from teachers.cache_build import build_cache

work = Path(sys.argv[1])
tok = tiny_tokenizer()
# Teacher and student both Qwen2 models: transformers picks the tokenizer class from the model type,
# and the cache's tokenizer fingerprint must match the student's.
shape = dict(num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=96, intermediate_size=192, num_hidden_layers=2, **shape))
teacher.save_pretrained(work / "teacher"); tok.save_pretrained(work / "teacher")
cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, **shape)
torch.manual_seed(0)
with torch.device("cuda"):
    student = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
student.save_pretrained(work / "student"); tok.save_pretrained(work / "student")
text = " ".join(f"{a} + {a + 1} = {2 * a + 1}." for a in range(400))
records = [{"prompt": f"Problem {i}:", "completion": text} for i in range(48)]
build_cache(str(work / "teacher"), None, work / "cache", top_k=16, records=records, max_length=1024,
            progress=False, log=lambda m: None)
print("student parameters:", sum(p.numel() for p in student.parameters()))
EOF

TRAIN_ARGS=(train --student "$WORK/student" --cache "$WORK/cache" --quant nf4 --lora-r 16 --lora-alpha 32
            --batch-size 4 --grad-accum 1 --steps "$STEPS" --eval-every 0 --save-every 0 --eval-fraction 0.1
            --warmup-steps 1 --no-progress --checkpoint-layers all)
LAUNCH=($PY -m accelerate.commands.launch --num_machines 1 --dynamo_backend no)

run() {  # run NAME CMD...: one training run with a timeout; its log and exit status land in $WORK
  local name=$1; shift
  local start=$(date +%s)
  timeout -k 10 "$RUN_TIMEOUT" "$@" --out "$WORK/run-$name" > "$WORK/$name.log" 2>&1
  echo $? > "$WORK/$name.rc"
  echo $(( $(date +%s) - start )) > "$WORK/$name.wall"
  echo "$name: exit $(cat "$WORK/$name.rc") in $(cat "$WORK/$name.wall") s" >&2
}

run single $PY cli.py "${TRAIN_ARGS[@]}"
if [ "$NGPU" -ge 2 ]; then
  run ddp "${LAUNCH[@]}" --multi_gpu --mixed_precision bf16 --num_processes "$NGPU" cli.py "${TRAIN_ARGS[@]}"
fi
run fsdp "${LAUNCH[@]}" --config_file examples/accelerate/fsdp-qlora.yaml --num_processes "$NGPU" cli.py "${TRAIN_ARGS[@]}"
if $PY -c "import deepspeed" 2>/dev/null; then
  run deepspeed "${LAUNCH[@]}" --config_file examples/accelerate/deepspeed-zero3.yaml --num_processes "$NGPU" cli.py "${TRAIN_ARGS[@]}"
fi

# 2. One JSON: per run, exit status, wall time, median tokens/s after the first step, peak memory, KL.
$PY - "$WORK" "$OUT/gpu_check_scaleout.json" "$NGPU" <<'EOF'
import json, statistics, subprocess, sys
from pathlib import Path
work, out, ngpu = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip().splitlines()
except OSError:
    gpu = []
result = {"gpus": gpu, "processes": ngpu, "runs": {}}
for rc_file in sorted(work.glob("*.rc")):
    name = rc_file.stem
    run_dir = work / f"run-{name}"
    rec = {"exit": int(rc_file.read_text()), "wall_s": int((work / f"{name}.wall").read_text())}
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()] if (run_dir / "metrics.jsonl").is_file() else []
    train = [m for m in metrics if m["kind"] == "train"]
    if len(train) > 1:
        rec["tokens_per_s_median"] = statistics.median(m["tokens_per_s"] for m in train[1:])
    rec["losses"] = [m["loss"] for m in train]
    summary = run_dir / "final" / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        rec.update({k: s.get(k) for k in ("engine", "processes", "peak_gpu_memory_gib", "final_eval_kl")})
    if rec["exit"] != 0:
        rec["log_tail"] = (work / f"{name}.log").read_text()[-3000:]
    result["runs"][name] = rec
base = result["runs"].get("single", {}).get("tokens_per_s_median")
for name, rec in result["runs"].items():
    if base and rec.get("tokens_per_s_median"):
        rec["tokens_per_s_vs_single"] = rec["tokens_per_s_median"] / base
out.write_text(json.dumps(result, indent=1))
print(json.dumps({n: {k: r.get(k) for k in ("exit", "tokens_per_s_median", "peak_gpu_memory_gib")} for n, r in result["runs"].items()}))
EOF
