"""Search over reasoning steps, guided by a step scorer: beam search and a small Monte-Carlo tree search.

Best-of-N spends its compute on N whole traces and judges them at the end; a search judges partial
traces and spends the rest of its budget on the promising ones. Both searches grow a trace one step
at a time, a step being one line (generation stops after a token that contains a newline, or at EOS),
and ask a step scorer (`distill.bench.steps`: the teacher's per-step log-prob or a trained step
scorer) for the value of a prefix: its step scores aggregated (min / product / last).

- **beam**: keep `beam_size` prefixes; each step, sample `width` one-step continuations of every
  live prefix, score them all, keep the `beam_size` best among them and the finished prefixes.
  Stops when every kept prefix is finished or after `max_steps` steps; the answer is that of the
  best finished prefix (the best prefix when none finished).
- **mcts**: `expansions` times: descend from the root by UCT (W/N + c * sqrt(ln N_parent / N)) while the
  node has `width` children, add one sampled step below it, finish it `rollouts` times by sampling to
  the end, score every rollout as a whole trace, and add their mean value to the new node and its
  ancestors. The answer is that of the highest-valued complete trace met (rollout or finished node).

Every token is counted: `generated_tokens` is every token the model sampled (steps, rollouts, the
EOS token included, as `Completion.num_tokens` counts), `scorer_tokens` the tokens of every scorer pass
(for the teacher: prompt and prefix, one prefill per scored prefix; no KV reuse across prefixes, so
that is what it costs). Every draw has its own seed derived from (seed, problem, node, child), so a
search is reproducible and does not depend on batching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from distill.models.sampling import Completion

# Each search setting is a `distill bench` option, declared (with its default, help and bounds) once as a
# `BenchConfig` field; this maps a setting to that field. `SearchSettings` has no defaults of its own, so
# the searches run with the same defaults whether called from the CLI, a run config or Python.
BENCH_OPTIONS = {"beam_size": "beam_size", "width": "search_width", "max_steps": "search_steps",
                 "step_max_tokens": "step_max_tokens", "max_new_tokens": "max_new_tokens",
                 "expansions": "mcts_expansions", "rollouts": "mcts_rollouts", "uct_c": "uct_c",
                 "temperature": "temperature", "top_p": "top_p", "seed": "seed", "batch_size": "batch_size"}


@dataclass
class SearchSettings:
    """What a search needs from the bench settings. Build it with `SearchSettings.from_bench`."""

    beam_size: int
    width: int
    max_steps: int
    step_max_tokens: int
    max_new_tokens: int
    expansions: int
    rollouts: int
    uct_c: float
    temperature: float
    top_p: float
    seed: int
    batch_size: int

    @classmethod
    def from_bench(cls, cfg=None, **overrides) -> "SearchSettings":
        """The settings of a `BenchConfig` (`cfg`; None: its declared defaults), `overrides` (by setting
        name) on top. `batch_size` None (the option's default) means the bench's scoring batch."""
        from distill.bench.runner import SCORING_BATCH, BenchConfig
        from distill.options import declared

        unknown = sorted(set(overrides) - set(BENCH_OPTIONS))
        if unknown:
            raise TypeError(f"unknown search settings {unknown}; known: {sorted(BENCH_OPTIONS)}")
        if cfg is None:
            source = {d.name: d.default for d in declared(BenchConfig)}
        else:
            source = {name: getattr(cfg, name) for name in BENCH_OPTIONS.values()}
        values = {setting: source[name] for setting, name in BENCH_OPTIONS.items()}
        if values["batch_size"] is None:
            values["batch_size"] = SCORING_BATCH
        return cls(**{**values, **overrides})


@dataclass
class Node:
    """A prefix of a trace (token ids of the model), and what the search knows about it."""

    ids: list[int]
    text: str
    finished: bool  # complete: ended with EOS or reached max_new_tokens
    parent: "Node | None" = None
    eos: bool = False  # ended with EOS (what `finished` means in samples.jsonl)
    new_tokens: int = 0  # tokens sampled to make this node from its parent (EOS included)
    value: float | None = None  # step scorer's value of the prefix (beam; MCTS: of finished nodes)
    scorer_tokens: int = 0
    children: list = field(default_factory=list)
    visits: int = 0
    total: float = 0.0
    depth: int = 0


@dataclass
class SearchResult:
    text: str  # the chosen trace
    generated_tokens: int
    scorer_tokens: int
    finished: bool  # the chosen trace ended with EOS (not cut by a token budget)
    value: float | None
    # ("generate", parent tokens, token budget, tokens sampled, ended by EOS) / ("score", text, tokens)
    log: list = field(default_factory=list)


class _Search:
    """What both searches share: the model, the step value, the token counters."""

    def __init__(self, model, tokenizer, value, question: str, prompt: str, settings: SearchSettings, stop_ids):
        from distill.models.sampling import row_seed

        self.model, self.tok, self.value_fn, self.q, self.s = model, tokenizer, value, question, settings
        self.prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        self.prompt, self.stop_ids, self.row_seed = prompt, stop_ids, row_seed
        self.generated = 0
        self.scored = 0
        self.log: list = []

    def _draw(self, parents: list[Node], tags: list[str], *, to_end: bool) -> list[Completion]:
        """One continuation per (parent, tag): a step (to the next newline) or, `to_end`, to EOS."""
        from distill.models.sampling import generate_rows

        out: list[Completion] = []
        # rows of one call share max_new_tokens: group by what each parent has left
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(parents):
            left = self.s.max_new_tokens - len(p.ids)
            groups.setdefault(left if to_end else min(self.s.step_max_tokens, left), []).append(i)
        results: dict[int, tuple[Completion, int]] = {}
        for budget, idx in groups.items():
            for a in range(0, len(idx), self.s.batch_size):
                chunk = idx[a:a + self.s.batch_size]
                comps = generate_rows(self.model, self.tok, [self.prompt_ids + parents[i].ids for i in chunk],
                                      [self.row_seed(self.s.seed, self.prompt, 0) ^ _tag_hash(tags[i]) for i in chunk],
                                      temperature=self.s.temperature, top_p=self.s.top_p, max_new_tokens=budget,
                                      stop_ids=None if to_end else self.stop_ids)
                for i, c in zip(chunk, comps):
                    results[i] = (c, budget)
        for i in range(len(parents)):
            c, budget = results[i]
            out.append(c)
            self.generated += c.num_tokens
            self.log.append(("generate", len(parents[i].ids), budget, c.num_tokens, c.finished))
        return out

    def _child(self, parent: Node, comp: Completion) -> Node:
        ids = parent.ids + list(comp.token_ids)
        text = self.tok.decode(ids, skip_special_tokens=False)
        finished = comp.finished or len(ids) >= self.s.max_new_tokens
        return Node(ids=ids, text=text, finished=finished, parent=parent, new_tokens=comp.num_tokens,
                    depth=parent.depth + 1, eos=comp.finished)

    def _values(self, nodes: list[Node]) -> list[float]:
        if not nodes:
            return []
        comps = [Completion(text=n.text, num_tokens=len(n.ids), mean_logprob=0.0, finished=n.finished) for n in nodes]
        scored = self.value_fn.evaluate([self.q] * len(nodes), comps)
        for n, s in zip(nodes, scored):
            self.scored += s.tokens
            n.scorer_tokens += s.tokens
            self.log.append(("score", n.text, s.tokens))
        return [s.weight for s in scored]


def _tag_hash(tag: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def beam_search(model, tokenizer, value, question: str, prompt: str, settings: SearchSettings,
                stop_ids: set[int]) -> SearchResult:
    """Beam search over steps (see the module docstring)."""
    run = _Search(model, tokenizer, value, question, prompt, settings, stop_ids)
    root = Node(ids=[], text="", finished=False)
    beams = [root]
    for step in range(settings.max_steps):
        live = [b for b in beams if not b.finished]
        if not live:
            break
        parents = [b for b in live for _ in range(settings.width)]
        tags = [f"beam/{step}/{bi}/{j}" for bi in range(len(live)) for j in range(settings.width)]
        children = [run._child(p, c) for p, c in zip(parents, run._draw(parents, tags, to_end=False))]
        for ch, v in zip(children, run._values(children)):
            ch.value = v
        pool = children + [b for b in beams if b.finished]
        order = sorted(range(len(pool)), key=lambda i: -pool[i].value)  # stable: ties keep pool order
        beams = [pool[i] for i in order[:settings.beam_size]]
    done = [b for b in beams if b.finished] or beams
    best = max(done, key=lambda b: b.value if b.value is not None else -1.0)
    return SearchResult(text=best.text, generated_tokens=run.generated, scorer_tokens=run.scored,
                        finished=best.eos, value=best.value, log=run.log)


def mcts(model, tokenizer, value, question: str, prompt: str, settings: SearchSettings,
         stop_ids: set[int]) -> SearchResult:
    """A small Monte-Carlo tree search over steps (see the module docstring)."""
    run = _Search(model, tokenizer, value, question, prompt, settings, stop_ids)
    root = Node(ids=[], text="", finished=False)
    complete: list[tuple[float, int, Node]] = []  # (value, order met, node) of every complete trace
    for it in range(settings.expansions):
        node = root
        while not node.finished and len(node.children) >= settings.width:
            log_n = math.log(max(1, node.visits))
            node = max(node.children, key=lambda ch: (ch.total / ch.visits if ch.visits else float("inf"))
                       + settings.uct_c * math.sqrt(log_n / max(1, ch.visits)))
        if not node.finished and node.depth < settings.max_steps:
            comp = run._draw([node], [f"mcts/{it}/expand"], to_end=False)[0]
            child = run._child(node, comp)
            node.children.append(child)
            node = child
        if node.finished:
            if node.value is None:
                node.value = run._values([node])[0]
                complete.append((node.value, len(complete), node))
            reward = node.value
        else:
            parents = [node] * settings.rollouts
            ends = [run._child(node, c) for c in run._draw(parents, [f"mcts/{it}/rollout/{r}" for r in range(settings.rollouts)],
                                                        to_end=True)]
            values = run._values(ends)
            for e, v in zip(ends, values):
                e.value = v
                complete.append((v, len(complete), e))
            reward = sum(values) / len(values)
        while node is not None:
            node.visits += 1
            node.total += reward
            node = node.parent
    if not complete:  # no expansion at all (expansions 0): nothing to answer with
        return SearchResult(text="", generated_tokens=run.generated, scorer_tokens=run.scored, finished=False,
                            value=None, log=run.log)
    _, _, best = max(complete, key=lambda t: (t[0], -t[1]))
    return SearchResult(text=best.text, generated_tokens=run.generated, scorer_tokens=run.scored,
                        finished=best.eos, value=best.value, log=run.log)


SEARCHES = {"beam": beam_search, "mcts": mcts}
