"""Scorers for best-of-N: the generating model's own confidence ("self"), a reward model, the teacher
as a verifier; several of them combined with weights.

Every scorer returns, per completion, a `Scored`: a non-negative weight in [0, 1] (higher is better,
so that weighted best-of-N can sum weights per answer) and the number of tokens the scorer had to
process for it (the compute it cost, for the accuracy-vs-tokens curves):
- "self": exp(mean token log-prob) of the completion under the model that wrote it (the per-token
  geometric-mean probability; no extra forward pass, it comes from sampling: 0 tokens);
- a reward model: an `AutoModelForSequenceClassification` directory. One output logit: sigmoid of it;
  two or more: softmax probability of the last label (the "good" class by convention). Its input is
  the question and completion through the reward model's chat template (user / assistant turns), or
  "question\\n\\ncompletion" when it has none; tokens = that input's length;
- the teacher as verifier (`teacher=DIR`): exp(mean) of the teacher's log-probability of the
  completion's tokens after the teacher's own prompt for the question (one batched prefill through a
  teacher backend); `teacher-sum=DIR` weighs by the summed log-prob instead, as exp(sum - max sum over
  the problem's samples), the likelihood relative to the most likely sample (exp(sum) itself
  underflows to 0 on long completions). Tokens = prompt + completion in the teacher's tokenizer.

`--scorer NAME=SPEC[:WEIGHT]` is repeatable (`parse_scorer_specs`); with several scorers a
completion's combined weight is sum_k WEIGHT_k * weight_k, and the combined compute is the sum over
the scorers' distinct passes (`teacher` and `teacher-sum` on one DIR share one prefill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from distill.errors import DistillError


@dataclass(frozen=True)
class Scored:
    """One completion's score: its weight in [0, 1], what it cost, and raw numbers for samples.jsonl."""

    weight: float
    tokens: int = 0  # tokens the scorer processed for this completion (0: free)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ScorerSpec:
    """One `--scorer NAME=SPEC[:WEIGHT]`: kind is self | reward-model | teacher | teacher-sum |
    teacher-steps | step-reward-model."""

    name: str
    kind: str
    target: str | None  # the directory (None for self)
    weight: float = 1.0

    @property
    def cost_key(self) -> str:
        """Scorers with the same cost key share one pass (the teacher's mean and sum)."""
        return f"teacher:{self.target}" if self.kind.startswith("teacher") else f"{self.kind}:{self.target}"


def _split_weight(text: str, item: str) -> tuple[str, float]:
    head, sep, tail = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return text, 1.0  # a colon inside a path, no weight
    if not math.isfinite(weight) or weight < 0:
        raise DistillError(f"--scorer {item!r}: the weight must be a finite number >= 0, got {tail}")
    return head, weight


def parse_scorer_specs(items: Sequence[str] | str | None) -> list[ScorerSpec]:
    """`--scorer` values -> specs. Accepted: `self`, `DIR` (a reward model, named by its path),
    `NAME=self`, `NAME=DIR`, `teacher=DIR` / `teacher-sum=DIR` / `teacher-steps=DIR` (the teacher as
    verifier: mean, summed or per-step log-prob; any name starting with `teacher` is a verifier, its
    ending picks the variant), `NAME=prm:DIR` (a trained step scorer on every prefix), each with an
    optional `:WEIGHT` (default 1). Names are unique; at least one weight is positive."""
    if items is None:
        items = ["self"]
    if isinstance(items, str):
        items = [items]
    specs: list[ScorerSpec] = []
    for item in items:
        item = str(item).strip()
        if not item:
            raise DistillError("--scorer is empty: use self, a reward model directory or teacher=DIR")
        name, sep, rest = item.partition("=")
        if not sep:
            rest, weight = _split_weight(item, item)
            name = "self" if rest == "self" else rest
        else:
            name = name.strip()
            rest, weight = _split_weight(rest.strip(), item)
            if not name or not rest:
                raise DistillError(f"malformed --scorer {item!r}: use NAME=SPEC[:WEIGHT], e.g. teacher=runs/teacher:0.5")
        if rest == "self":
            spec = ScorerSpec(name, "self", None, weight)
        elif rest.startswith("prm:"):
            spec = ScorerSpec(name, "step-reward-model", rest[len("prm:"):], weight)
        elif name.startswith("teacher"):
            kind = "teacher-sum" if name.endswith("-sum") else "teacher-steps" if name.endswith("-steps") else "teacher"
            spec = ScorerSpec(name, kind, rest, weight)
        else:
            spec = ScorerSpec(name, "reward-model", rest, weight)
        specs.append(spec)
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DistillError(f"--scorer name {dup[0]!r} is given twice; give every scorer its own NAME=")
    if not any(s.weight > 0 for s in specs):
        raise DistillError("every --scorer weight is 0: give at least one scorer a positive weight")
    return specs


class SelfScorer:
    name = "self"
    description = "exp(mean token log-prob) of the completion under the model that generated it"

    def score(self, questions: Sequence[str], completions: Sequence) -> list[float]:
        return [s.weight for s in self.evaluate(questions, completions)]

    def evaluate(self, questions: Sequence[str], completions: Sequence) -> list[Scored]:
        return [Scored(math.exp(min(0.0, float(c.mean_logprob)))) for c in completions]

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
        from distill.models.sampling import scorer_text

        return scorer_text(self.tokenizer, question, completion)

    def score(self, questions: Sequence[str], completions: Sequence) -> list[float]:
        return [s.weight for s in self.evaluate(questions, completions)]

    def evaluate(self, questions: Sequence[str], completions: Sequence) -> list[Scored]:
        import torch

        texts = [self._text(q, c.text) for q, c in zip(questions, completions)]
        out: list[Scored] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length, add_special_tokens=False)
            lengths = enc["attention_mask"].sum(-1).tolist()
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()
            if logits.shape[-1] == 1:
                probs = torch.sigmoid(logits[:, 0])
            else:
                probs = torch.softmax(logits, dim=-1)[:, -1]
            out.extend(Scored(float(x), int(n)) for x, n in zip(probs.cpu(), lengths))
        return out

    def close(self) -> None:
        del self.model


class TeacherScorer:
    """The teacher as verifier: weight exp(mean log-prob) (`teacher`) or exp(sum - max sum) over the
    completions scored together, one problem's samples (`teacher-sum`); see `distill.bench.verifier`."""

    def __init__(self, spec: ScorerSpec, logprobs):
        self.spec, self.logprobs = spec, logprobs
        self.name = spec.name
        what = "summed" if spec.kind == "teacher-sum" else "mean"
        self.description = f"teacher {spec.target} as verifier: {what} token log-prob of the completion"

    def evaluate(self, questions: Sequence[str], completions: Sequence) -> list[Scored]:
        scored = self.logprobs.score(list(questions), [c.text for c in completions])
        extra = [{"teacher_mean_logprob": s.mean if s.ids else None, "teacher_sum_logprob": s.sum,
                  "teacher_tokens": len(s.ids)} for s in scored]
        if self.spec.kind == "teacher-sum":
            top = max((s.sum for s in scored if s.ids), default=0.0)
            weights = [math.exp(s.sum - top) if s.ids else 0.0 for s in scored]
        else:
            weights = [math.exp(min(0.0, s.mean)) if s.ids else 0.0 for s in scored]
        return [Scored(w, s.tokens, e) for w, s, e in zip(weights, scored, extra)]

    def score(self, questions: Sequence[str], completions: Sequence) -> list[float]:
        return [s.weight for s in self.evaluate(questions, completions)]

    def close(self) -> None:
        pass


class TeacherStepScorer:
    """The teacher's per-step log-prob (`teacher-steps=DIR`): each step's exp(mean token log-prob)
    given the prompt and the steps before it, aggregated (`distill.bench.steps`). It shares the
    teacher's prefill with `teacher` / `teacher-sum` on the same DIR."""

    def __init__(self, spec: ScorerSpec, logprobs, *, steps: str = "auto", aggregate: str = "min", owns: bool = False):
        self.spec, self.logprobs, self.steps, self.how = spec, logprobs, steps, aggregate
        self.owns = owns  # close the teacher with this scorer (the searches' own step scorer)
        self.name = spec.name
        self.description = (f"teacher {spec.target} per step ({steps} steps, {aggregate}): exp(mean token log-prob "
                            "of each step given the ones before")

    def evaluate(self, questions: Sequence[str], completions: Sequence) -> list[Scored]:
        from distill.bench.steps import aggregate, split_steps, step_scores_from_logprobs

        out = []
        for c, s in zip(completions, self.logprobs.score(list(questions), [c.text for c in completions])):
            steps = step_scores_from_logprobs(s.logprobs, s.offsets, split_steps(c.text, self.steps))
            out.append(Scored(aggregate(steps, self.how), s.tokens, {"step_scores": steps}))
        return out

    def score(self, questions: Sequence[str], completions: Sequence) -> list[float]:
        return [s.weight for s in self.evaluate(questions, completions)]

    def close(self) -> None:
        if self.owns:
            self.logprobs.close()


class StepRewardScorer:
    """A trained step scorer (`NAME=prm:DIR`, a sequence classifier such as `distill scorer train
    --steps` saves): its probability for the prefix that ends with each step, aggregated. One pass per
    prefix, so its tokens are the sum of the prefixes' lengths."""

    def __init__(self, spec: ScorerSpec, *, steps: str = "auto", aggregate: str = "min", batch_size: int = 8,
                 trust_remote_code: bool = False):
        self.spec, self.steps, self.how = spec, steps, aggregate
        self.model = RewardModelScorer(spec.target, batch_size=batch_size, trust_remote_code=trust_remote_code)
        self.name = spec.name
        self.description = f"step scorer {spec.target} on every prefix ({steps} steps, {aggregate})"

    def evaluate(self, questions: Sequence[str], completions: Sequence) -> list[Scored]:
        from distill.bench.steps import aggregate, split_steps
        from distill.models.sampling import Completion

        out = []
        for q, c in zip(questions, completions):
            spans = split_steps(c.text, self.steps)
            prefixes = [Completion(text=c.text[:b], num_tokens=0, mean_logprob=0.0, finished=False) for _, b in spans]
            scored = self.model.evaluate([q] * len(prefixes), prefixes) if prefixes else []
            steps = [s.weight for s in scored]
            out.append(Scored(aggregate(steps, self.how), sum(s.tokens for s in scored), {"step_scores": steps}))
        return out

    def score(self, questions: Sequence[str], completions: Sequence) -> list[float]:
        return [s.weight for s in self.evaluate(questions, completions)]

    def close(self) -> None:
        self.model.close()


class ScorerSet:
    """The scorers of one benchmark with their weights; `evaluate` gives every scorer's `Scored` and
    the combination (weight sum_k WEIGHT_k * weight_k, tokens summed over distinct passes)."""

    def __init__(self, specs: list[ScorerSpec], scorers: list, shared: list):
        self.specs, self.scorers, self._shared = specs, scorers, shared
        self.names = [s.name for s in specs]

    @property
    def name(self) -> str:
        if len(self.specs) == 1:
            s = self.specs[0]
            return "self" if s.kind == "self" else (s.target if s.kind == "reward-model" else f"{s.name}={s.target}")
        return " + ".join(f"{s.weight:g}*{s.name}" for s in self.specs)

    @property
    def description(self) -> str:
        return "; ".join(f"{s.name} (weight {spec.weight:g}): {s.description}" for s, spec in zip(self.scorers, self.specs))

    def describe(self) -> list[dict]:
        return [{"name": s.name, "kind": s.kind, "target": s.target, "weight": s.weight, "cost_key": s.cost_key}
                for s in self.specs]

    def evaluate(self, questions: Sequence[str], completions: Sequence) -> tuple[dict[str, list[Scored]], list[Scored]]:
        """({scorer name: its Scored per completion}, the combined Scored per completion)."""
        each = {spec.name: scorer.evaluate(questions, completions) for spec, scorer in zip(self.specs, self.scorers)}
        combined = []
        for i in range(len(completions)):
            weight = sum(spec.weight * each[spec.name][i].weight for spec in self.specs)
            passes = {spec.cost_key: each[spec.name][i].tokens for spec in self.specs}
            combined.append(Scored(weight, sum(passes.values())))
        return each, combined

    def score(self, questions: Sequence[str], completions: Sequence) -> list[float]:
        return [s.weight for s in self.evaluate(questions, completions)[1]]

    def close(self) -> None:
        for s in self.scorers:
            s.close()
        for s in self._shared:
            s.close()


def make_step_scorer(spec: ScorerSpec, *, system_prompt: str | None = None, batch_size: int = 8,
                     aggregate: str = "min", trust_remote_code: bool = False):
    """The value function of the searches: a step scorer over lines (the searches' steps)."""
    from distill.bench.verifier import TeacherLogprobs

    if spec.kind == "teacher-steps":
        logprobs = TeacherLogprobs(spec.target, system_prompt=system_prompt, batch_size=batch_size,
                                   trust_remote_code=trust_remote_code)
        return TeacherStepScorer(spec, logprobs, steps="lines", aggregate=aggregate, owns=True)
    return StepRewardScorer(spec, steps="lines", aggregate=aggregate, batch_size=batch_size,
                            trust_remote_code=trust_remote_code)


def make_scorers(items: Sequence[str] | str | None, *, system_prompt: str | None = None, batch_size: int = 8,
                 trust_remote_code: bool = False, only_self: bool = False, steps: str = "auto",
                 step_aggregate: str = "min") -> ScorerSet:
    """Load every `--scorer` (a teacher directory named twice loads once). `only_self`: the specs are
    checked but the models are not loaded (processes that only generate)."""
    from distill.bench.verifier import TeacherLogprobs

    specs = parse_scorer_specs(items)
    scorers, teachers = [], {}
    for spec in specs:
        if spec.kind == "self" or only_self:
            scorers.append(SelfScorer())
        elif spec.kind == "reward-model":
            scorers.append(RewardModelScorer(spec.target, batch_size=batch_size, trust_remote_code=trust_remote_code))
        elif spec.kind == "step-reward-model":
            scorers.append(StepRewardScorer(spec, steps=steps, aggregate=step_aggregate, batch_size=batch_size,
                                            trust_remote_code=trust_remote_code))
        else:
            if spec.target not in teachers:
                teachers[spec.target] = TeacherLogprobs(spec.target, system_prompt=system_prompt, batch_size=batch_size,
                                                        trust_remote_code=trust_remote_code)
            if spec.kind == "teacher-steps":
                scorers.append(TeacherStepScorer(spec, teachers[spec.target], steps=steps, aggregate=step_aggregate))
            else:
                scorers.append(TeacherScorer(spec, teachers[spec.target]))
    return ScorerSet(specs, scorers, list(teachers.values()))


def make_scorer(spec: str | None, **kwargs):
    """'self' (or None) -> SelfScorer; anything else is a reward model path."""
    if spec is None or spec == "self":
        return SelfScorer()
    return RewardModelScorer(spec, **kwargs)
