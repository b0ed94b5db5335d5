"""The README.md model card written next to an exported student: where it came from and how good it is."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(v, digits=4):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_model_card(directory: Path, run: dict, run_dir: Path, export: dict) -> Path:
    cfg = run.get("config", {})
    cache = run.get("cache", {}) or {}
    loss = run.get("loss", {}) or {}
    student = run.get("student", {}) or {}
    lora = student.get("lora", {}) or {}
    summary = {}
    sfile = Path(run_dir) / "final" / "summary.json"
    if sfile.is_file():
        summary = json.loads(sfile.read_text())
    teacher = cache.get("teacher") or {}
    teacher_name = teacher.get("name_or_path") or teacher.get("path") or teacher.get("name") or teacher.get("id") or json.dumps(teacher)[:120]
    load_line = ("AutoModelForCausalLM.from_pretrained(path)  # loads in NF4 4-bit; needs bitsandbytes"
                 if export["format"] == "bnb-4bit" else f"AutoModelForCausalLM.from_pretrained(path, dtype=torch.{ {'bf16': 'bfloat16', 'fp16': 'float16', 'fp32': 'float32'}[export['dtype']] })")
    text = f"""---
library_name: transformers
tags: [distill, knowledge-distillation, qlora]
---
# Distilled student

Made with `distill`: a {student.get('quant', '?')} student with LoRA adapters trained on a cached teacher
distribution (sparse top-k KD), then exported as **{export['format']}** ({export['dtype']}).

| | |
|---|---|
| teacher | `{teacher_name}` |
| student base | `{student.get('path')}` (trained as {student.get('quant')}) |
| cache | `{cache.get('path')}` (top-{cache.get('k')}, T={cache.get('temperature')}, tokenizer {str(cache.get('tokenizer_fingerprint'))[:23]}...) |
| loss | {loss.get('name')} at T={loss.get('temperature')}{', tail re-tempered ' + str(loss.get('tail_rule')) if loss.get('tail_rule') else ''}, kd_weight={loss.get('kd_weight')}, ce_weight={loss.get('ce_weight')} |
| LoRA | r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, targets={lora.get('target_modules') or 'all linear'} |
| steps | {summary.get('steps', 'n/a')} (lr {cfg.get('lr')}, grad_accum {cfg.get('grad_accum')}) |
| held-out KL to teacher | {_fmt(summary.get('final_eval_kl'))} nats/token over {summary.get('eval_tokens', 'n/a')} tokens |
| held-out top-1 agreement | {_fmt(summary.get('final_top1_agreement'))} |

Load it:

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = {load_line}
tokenizer = AutoTokenizer.from_pretrained(path)
```

The merged export folds the adapters into the base reloaded unquantized, so its outputs differ from the
trained 4/8-bit model by the base quantization error only.
"""
    path = Path(directory) / "README.md"
    path.write_text(text)
    return path
