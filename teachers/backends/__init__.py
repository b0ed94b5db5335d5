"""Teacher backends: the one place that runs a teacher model for trace generation and cache building.

`distill teacher generate` and `distill cache build` never touch a model: they ask a backend, chosen
with `--backend NAME` (default "hf"), for two operations:

  generate(prompt_ids, seeds, *, temperature, top_p, max_new_tokens, batch_size=None, batch_tokens=None,
           on_step=None, on_row=None) -> list[Completion]
      one completion per row (token ids of an already formatted prompt), in input order; each row is
      sampled from its own generator seeded by `seeds[row]`, so N samples of a prompt are N rows with
      distinct seeds and a row's result does not depend on its batch. temperature 0 is greedy. The
      backend batches the rows itself (`batch_size` rows, or `batch_tokens` KV positions, at a time)
      and, given the same rows, must decode them the same way every time (resumed trace files rely on
      it). `on_step(n)` is called with the number of tokens produced at each decoding step (progress
      bars), `on_row(i, completion)` as soon as row i ends (traces are written then).
  score(seqs, positions, *, k, temperature) -> (ids [R, k] int64, logprobs [R, k] float32), on the CPU
      the teacher's sparse target at every requested position: positions[b] indexes seqs[b]; row r of
      the result is the top-k of log_softmax(logits / temperature) over the tokenizer's vocabulary
      (columns past it dropped), descending. The tail mass is 1 - sum(exp(logprobs)).

and optionally, for cache codecs that need the teacher's whole distribution (sampling):

  score_rows(seqs, positions, *, temperature, reduce) -> dict of [R, ...] tensors on the CPU
      reduce(x, row) is called on chunks x [C, V] fp32 of log-softmax inputs logits[:, :vocab] / T (the
      scaled logits of the requested rows, C rows at a time, `row` = index of x's first row among all
      R rows); the results are concatenated row-wise. The full [R, V] block is never built.

and five properties: `tokenizer` (a Hugging Face tokenizer: prompts, records and the cache's
fingerprint are made with it), `vocab_size` (len(tokenizer)), `logits_width` (the model's output
width, >= vocab_size), `identity` (a dict recorded in the cache manifest and in every trace: resuming
with another teacher is refused by comparing it) and `build_info` (a dict recorded in the manifest's
build section). The tokenizer is ready when the backend is constructed; the weights load on `load()`
or the first use, so input mistakes are caught before a large model loads.

A backend is constructed as Backend(teacher, *, device=None, quant="none", dtype=None,
trust_remote_code=False, revision=None, device_map=None, max_memory=None) and raises DistillError for
anything it does not support. `device_map` ("auto", ...) asks for a teacher spread over several devices
(`max_memory` caps each one); a backend that cannot do that refuses it.

Adding a backend: write `teachers/backends/NAME.py` with a class that has the operations and
properties above and a `name` attribute, and add one line `"NAME": NameBackend` to BACKENDS below.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from distill.errors import DistillError
from teachers.backends.hf import HFBackend


@runtime_checkable
class TeacherBackend(Protocol):
    name: str

    @property
    def tokenizer(self) -> Any: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def logits_width(self) -> int: ...

    @property
    def identity(self) -> dict: ...

    @property
    def build_info(self) -> dict: ...

    def load(self) -> None: ...

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], *, temperature: float, top_p: float,
                 max_new_tokens: int, batch_size: int | None = None, batch_tokens: int | None = None,
                 on_step=None, on_row=None) -> list: ...

    def score(self, seqs, positions, *, k: int, temperature: float) -> tuple[Any, Any]: ...


BACKENDS: dict[str, type] = {
    "hf": HFBackend,
}


def check_backend(name: str) -> str:
    """`name` if a backend is registered under it, else the one-line error listing the known ones."""
    if name not in BACKENDS:
        raise DistillError(f"unknown --backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}")
    return name


def get_backend(name: str, teacher: str, **options) -> TeacherBackend:
    """The backend registered as `name`, constructed for `teacher` (its tokenizer loaded, not its weights)."""
    return BACKENDS[check_backend(name)](teacher, **options)
