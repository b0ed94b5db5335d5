"""Scorers for best-of-N: a reward model, or the generating model's own confidence ("self").

Both return non-negative weights in [0, 1] (higher is better), so that weighted best-of-N can sum
them per answer:
- "self": exp(mean token log-prob) of the completion under the model that wrote it (the per-token
  geometric-mean probability; no extra forward pass, it comes from sampling);
- a reward model: an `AutoModelForSequenceClassification` directory. One output logit: sigmoid of it;
  two or more: softmax probability of the last label (the "good" class by convention). Its input is
  the question and completion through the reward model's chat template (user / assistant turns), or
  "question\\n\\ncompletion" when it has none.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from distill.errors import DistillError


class SelfScorer:
    name = "self"
    description = "exp(mean token log-prob) of the completion under the model that generated it"

    def score(self, questions: Sequence[str], completions: Sequence) -> list[float]:
        return [math.exp(min(0.0, float(c.mean_logprob))) for c in completions]

    def close(self) -> None:
        pass


class RewardModelScorer:
    description = "reward model (sequence classification) probability of the completion being good"

    def __init__(self, path: str, *, batch_size: int = 8, max_length: int = 2048, trust_remote_code: bool = False):
        from distill.models import load_model, load_tokenizer, resolve_source

        what = "--scorer"
        source = resolve_source(path, what=what)
        cfg_file = Path(source.path) / "config.json"
        if source.kind == "dir":
            import json

            try:
                archs = json.loads(cfg_file.read_text()).get("architectures") or []
            except ValueError:
                archs = []
            if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
                raise DistillError(f"--scorer {path} is a {archs[0]}, not a reward model (a *ForSequenceClassification "
                                   "with a trained score head); pass a reward model directory or 'self'")
        # dtype "auto": a reward model runs in the dtype it was saved in.
        self.tokenizer = load_tokenizer(source, what=what, trust_remote_code=trust_remote_code, require_pad=True)
        self.model = load_model(source, what=what, task="sequence-classification", dtype="auto",
                                trust_remote_code=trust_remote_code)
        # Sequence classification heads pick the last non-pad token: they need to know the pad id.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.device = next(self.model.parameters()).device
        self.name = str(path)
        self.batch_size = batch_size
        self.max_length = max_length

    def _text(self, question: str, completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": completion}]
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False)
            return text if isinstance(text, str) else text[0]
        return f"{question}\n\n{completion}"

    def score(self, questions: Sequence[str], completions: Sequence) -> list[float]:
        import torch

        texts = [self._text(q, c.text) for q, c in zip(questions, completions)]
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length, add_special_tokens=False)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()
            if logits.shape[-1] == 1:
                probs = torch.sigmoid(logits[:, 0])
            else:
                probs = torch.softmax(logits, dim=-1)[:, -1]
            out.extend(float(x) for x in probs.cpu())
        return out

    def close(self) -> None:
        del self.model


def make_scorer(spec: str | None, **kwargs):
    """'self' (or None) -> SelfScorer; anything else is a reward model path."""
    if spec is None or spec == "self":
        return SelfScorer()
    return RewardModelScorer(spec, **kwargs)
