"""`distill scorer train`: a learned outcome reward model from our own traces.

No reward model ships in a package here, and the verifier already knows which generated traces are
right: so fit a small sequence-classification head on a backbone we have (the student's or the
teacher's), with LoRA on its attention, on the verifier's correct / incorrect label of every trace.
The result is merged and saved as a plain `*ForSequenceClassification` directory that
`distill bench --scorer NAME=DIR` loads (`RewardModelScorer`: softmax probability of the last label,
"correct"), and its held-out AUC (problems never seen in training) says whether it ranks right
answers above wrong ones at all before anyone spends compute on it.

Input: a traces JSONL as `distill teacher generate` writes it (question, completion, gold), or any
JSONL with question and completion and either gold or a boolean `correct`. The label is `correct` when
given, else `answers_match(extract_answer(completion), gold)` (`teachers.verify`). The input text is
`distill.models.sampling.scorer_text`, the one the bench scores.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError
from distill.options import option


@dataclass
class ScorerTrainConfig:
    """`distill scorer train` (declared once: the CLI options come from these fields)."""

    traces: Path = option(help="Traces JSONL: question, completion and gold (or a boolean 'correct').", argument=True)
    base: str = option(help="Backbone model directory (the student's or the teacher's).", metavar="DIR")
    out: Path = option(help="Directory for the trained scorer (what --scorer loads).", short="-o")
    lora_r: int = option(8, "LoRA rank on the attention projections.", minimum=1)
    lora_alpha: int = option(16, "LoRA alpha.", minimum=1)
    epochs: int = option(3, "Passes over the training traces.", minimum=1)
    lr: float = option(5e-4, "Learning rate (AdamW).", exclusive_minimum=0)
    batch_size: int = option(8, "Traces per step.", minimum=1)
    max_length: int = option(512, "Longest input in tokens (longer ones are truncated).", minimum=8)
    held_out: float = option(0.2, "Fraction of the problems kept out of training for the AUC.", exclusive_minimum=0,
                             exclusive_maximum=1)
    seed: int = option(0, "Seed of the split, the head's initialisation and the batch order.")


def load_labelled(path: Path) -> list[dict]:
    """[{question, completion, label, group}]: the label from `correct` or from the verifier."""
    from teachers.verify import answers_match, extract_answer

    if not Path(path).is_file():
        raise DistillError(f"traces {path} does not exist")
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise DistillError(f"traces {path} line {i + 1} is not JSON") from None
        if "question" not in rec or "completion" not in rec or ("correct" not in rec and "gold" not in rec):
            raise DistillError(f"traces {path} line {i + 1} needs question, completion and gold (or correct)")
        if "correct" in rec:
            label = bool(rec["correct"])
        else:
            pred = extract_answer(rec["completion"])
            label = pred is not None and bool(answers_match(pred, str(rec["gold"])))
        out.append({"question": rec["question"], "completion": rec["completion"], "label": int(label),
                    "group": str(rec.get("prompt_id", rec["question"]))})
    if not out:
        raise DistillError(f"traces {path} has no records")
    return out


def split_by_problem(records: list[dict], held_out: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out problems (all their traces) vs the rest: a scorer must not be scored on a problem it saw."""
    groups = sorted({r["group"] for r in records})
    random.Random(seed).shuffle(groups)
    n_out = max(1, round(held_out * len(groups))) if len(groups) > 1 else 0
    test = set(groups[:n_out])
    return [r for r in records if r["group"] not in test], [r for r in records if r["group"] in test]


def auc(scores: list[float], labels: list[int]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None without both classes."""
    pos = sum(labels)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def _batches(tok, records, batch_size: int, max_length: int, device):
    from distill.models.sampling import scorer_text

    for a in range(0, len(records), batch_size):
        chunk = records[a:a + batch_size]
        enc = tok([scorer_text(tok, r["question"], r["completion"]) for r in chunk], return_tensors="pt", padding=True,
                  truncation=True, max_length=max_length, add_special_tokens=False)
        import torch

        yield {k: v.to(device) for k, v in enc.items()}, torch.tensor([r["label"] for r in chunk], device=device)


def _scores(model, tok, records, batch_size, max_length, device) -> list[float]:
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for enc, _ in _batches(tok, records, batch_size, max_length, device):
            out.extend(torch.softmax(model(**enc).logits.float(), -1)[:, -1].tolist())
    return out


def train_scorer(cfg: ScorerTrainConfig, *, log=print) -> dict:
    """Train, save the merged scorer into cfg.out with `scorer_train.json`, return the summary."""
    import torch
    from peft import LoraConfig, get_peft_model

    from distill.io import atomic_write_json
    from distill.models import load_model, load_tokenizer, resolve_source

    records = load_labelled(cfg.traces)
    train, test = split_by_problem(records, cfg.held_out, cfg.seed)
    if len({r["label"] for r in train}) < 2:
        raise DistillError(f"traces {cfg.traces}: the training problems have only "
                           f"{'correct' if train and train[0]['label'] else 'incorrect'} traces; a scorer needs both")
    source = resolve_source(cfg.base, what="--base", accept=("dir", "hub"))
    tok = load_tokenizer(source, what="--base", require_pad=True)
    tok.padding_side = "right"
    torch.manual_seed(cfg.seed)
    model = load_model(source, what="--base", task="sequence-classification", dtype="fp32")
    model.config.pad_token_id = tok.pad_token_id
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    targets = [t for t in ("q_proj", "k_proj", "v_proj", "o_proj") if t in names] or "all-linear"
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets,
                                             lora_dropout=0.0, bias="none", task_type="SEQ_CLS"))
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    # balance the classes: a verifier that is right 10% of the time should not teach "always wrong"
    pos = sum(r["label"] for r in train)
    weight = torch.tensor([len(train) / (2 * (len(train) - pos)), len(train) / (2 * pos)], device=device)
    rng = random.Random(cfg.seed)
    losses = []
    for epoch in range(cfg.epochs):
        model.train()
        order = train[:]
        rng.shuffle(order)
        total = 0.0
        for enc, labels in _batches(tok, order, cfg.batch_size, cfg.max_length, device):
            loss = torch.nn.functional.cross_entropy(model(**enc).logits.float(), labels, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(labels)
        losses.append(total / len(train))
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {losses[-1]:.4f}")
    held_scores = _scores(model, tok, test, cfg.batch_size, cfg.max_length, device) if test else []
    train_scores = _scores(model, tok, train, cfg.batch_size, cfg.max_length, device)
    merged = model.merge_and_unload()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tok.save_pretrained(out)
    summary = {
        "base": str(cfg.base), "traces": str(cfg.traces), "out": str(out),
        "train": {"traces": len(train), "correct": pos, "auc": auc(train_scores, [r["label"] for r in train])},
        "held_out": {"traces": len(test), "problems": len({r["group"] for r in test}),
                     "correct": sum(r["label"] for r in test), "auc": auc(held_scores, [r["label"] for r in test])},
        "losses": losses,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
    }
    atomic_write_json(out / "scorer_train.json", summary)
    return summary


def _auc_text(x) -> str:
    return "n/a (one class only)" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
