"""The teacher as a verifier: its log-probability of every token of a student's completion.

A distilled student has its teacher at hand, so the teacher can judge the student's samples: a
completion the teacher finds likely is one it would have written. The text is re-tokenized with the
teacher's tokenizer (the student's may differ) as `prompt + completion`, where the prompt is the
teacher's own chat prompt for the question (`format_prompt`, the system prompt of the benchmark), and
one prefill per batch through a teacher backend (`teachers.backends`, the seam `distill cache build`
uses) gives log p_teacher(token | everything before it) at every completion position. The backend's
`score_rows` hands over the scaled logits of the requested rows a chunk at a time, so no [B, T, V]
tensor is built.

Results are kept per (question, completion text): the mean and the sum scorers, and the step-level
scorer, on the same completion share one prefill (the benchmark counts its tokens once: scorers that
share a pass have one `ScorerSpec.cost_key`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from distill.errors import DistillError


@dataclass(frozen=True)
class TokenLogprobs:
    """The teacher's view of one completion."""

    prompt_tokens: int  # tokens of the teacher's prompt (prefilled, not scored)
    ids: tuple[int, ...]  # the completion in the teacher's tokenizer
    logprobs: tuple[float, ...]  # log p_teacher(ids[i] | prompt, ids[:i]), temperature 1
    offsets: tuple[tuple[int, int], ...]  # each token's character span in the completion text

    @property
    def tokens(self) -> int:
        """The tokens the prefill processed: prompt and completion."""
        return self.prompt_tokens + len(self.ids)

    @property
    def sum(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean(self) -> float:
        """Mean token log-prob; -inf for an empty completion (nothing to vouch for)."""
        return self.sum / len(self.ids) if self.ids else float("-inf")


class TeacherLogprobs:
    """Batched teacher prefills over (question, completion) pairs, through a teacher backend."""

    def __init__(self, teacher: str, *, system_prompt: str | None, batch_size: int = 8, backend: str = "hf",
                 trust_remote_code: bool = False, backend_obj=None):
        from teachers.backends import get_backend

        self.backend = backend_obj or get_backend(backend, teacher, trust_remote_code=trust_remote_code)
        if not hasattr(self.backend, "score_rows"):
            raise DistillError(f"teacher backend {self.backend.name!r} has no score_rows: it cannot verify completions")
        self.system_prompt = system_prompt
        self.batch_size = max(1, int(batch_size))
        self._memo: dict[tuple[str, str], TokenLogprobs] = {}
        self._prompts: dict[str, list[int]] = {}

    @property
    def tokenizer(self):
        return self.backend.tokenizer

    def _prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompts:
            from distill.models.sampling import format_prompt

            text = format_prompt(self.tokenizer, question, self.system_prompt)
            self._prompts[question] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._prompts[question]

    def _completion(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def score(self, questions: Sequence[str], texts: Sequence[str]) -> list[TokenLogprobs]:
        """One `TokenLogprobs` per (question, completion text); new pairs are prefilled in batches."""
        import torch

        todo = []
        for q, t in zip(questions, texts):
            if (q, t) not in self._memo and (q, t) not in todo:
                todo.append((q, t))
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            prompts = [self._prompt_ids(q) for q, _ in batch]
            comps = [self._completion(t) for _, t in batch]
            scored = [i for i, (ids, _) in enumerate(comps) if ids]
            values: list[list[float]] = [[] for _ in batch]
            if scored:
                seqs = [prompts[i] + comps[i][0] for i in scored]
                # position p predicts token p + 1: the completion's tokens are predicted from P - 1 ... P + L - 2
                positions = [list(range(len(prompts[i]) - 1, len(prompts[i]) + len(comps[i][0]) - 1)) for i in scored]
                targets = torch.tensor([t for i in scored for t in comps[i][0]], dtype=torch.long)

                def reduce(x, row, targets=targets):
                    t = targets[row:row + x.shape[0]].to(x.device)
                    return {"lp": x.gather(1, t[:, None])[:, 0] - torch.logsumexp(x, dim=-1)}

                flat = self.backend.score_rows(seqs, positions, temperature=1.0, reduce=reduce)["lp"].tolist()
                at = 0
                for i in scored:
                    n = len(comps[i][0])
                    values[i] = flat[at:at + n]
                    at += n
            for i, (q, t) in enumerate(batch):
                self._memo[(q, t)] = TokenLogprobs(len(prompts[i]), tuple(comps[i][0]), tuple(values[i]),
                                                   tuple(comps[i][1]))
        return [self._memo[(q, t)] for q, t in zip(questions, texts)]

    def close(self) -> None:
        self._memo.clear()
        self.backend = None
