"""The Hugging Face backend: the teacher as a transformers causal LM loaded through `distill.models`.

Sources: a model directory, a hub id or a .gguf file (de-quantized by transformers), optionally
quantized to NF4 / int8 at load, on one device or (`device_map="auto"`) spread by accelerate's
big-model loading over the machine's GPUs and, past their memory, the CPU. `generate` is `distill.models.sampling.generate_rows`; `score` runs the
decoder body once per batch and applies the model's own output head to the requested rows only
(`RowScorer`), falling back to full logits for a model whose forward the head does not reproduce.
"""

from __future__ import annotations

from typing import Sequence

import torch

from distill.errors import DistillError

# Tokens the output head is checked on at load time (any text works: the check compares the rebuilt
# head with the model's own logits, position by position).
_HEAD_PROBE_TEXT = "Tom has 3 apples and buys 4 more. How many apples does he have?"


@torch.no_grad()
def topk_logprobs(logits: torch.Tensor, vocab: int, k: int, temperature: float, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax(logits[:, :vocab] / T) in fp32: (ids [R,k] int64, log-probs [R,k] fp32, descending).

    Columns past `vocab` (padded embedding rows) are dropped before the normaliser, never zero-filled.
    Rows are processed in chunks so that the fp32 copy stays small; top-k is taken on the scaled logits and
    the log-normaliser subtracted afterwards (same result as log_softmax, one full pass fewer).
    """
    R = logits.shape[0]
    ids = torch.empty((R, k), dtype=torch.int64, device=logits.device)
    vals = torch.empty((R, k), dtype=torch.float32, device=logits.device)
    inv_t = 1.0 / float(temperature)
    for a in range(0, R, chunk):
        x = logits[a:a + chunk, :vocab].float()
        if inv_t != 1.0:
            x = x * inv_t
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        v, i = torch.topk(x, k, dim=-1, sorted=True)
        vals[a:a + chunk] = v - lse
        ids[a:a + chunk] = i
    return ids, vals


@torch.no_grad()
def reduce_logits(logits: torch.Tensor, vocab: int, temperature: float, reduce, *, first_row: int = 0,
                  chunk: int = 512) -> dict[str, torch.Tensor]:
    """Apply `reduce(x, row)` to chunks of scaled fp32 logits x = logits[:, :vocab] / T (columns past the
    vocabulary dropped, as in `topk_logprobs`); `row` is the index of x's first row among all rows
    requested. Returns the chunks' results concatenated row-wise."""
    parts = []
    inv_t = 1.0 / float(temperature)
    for a in range(0, logits.shape[0], chunk):
        x = logits[a:a + chunk, :vocab].float()
        if inv_t != 1.0:
            x = x * inv_t
        parts.append(reduce(x, first_row + a))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(max(len(s) for s in seqs), 1)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        att[b, : len(s)] = 1
    return ids.to(device), att.to(device)


@torch.no_grad()
def teacher_forward(model, seqs: Sequence[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    """Plain right-padded forward of a batch; returns logits [B, T, W] (model dtype, on device)."""
    ids, att = _pad(seqs, pad_id, device)
    return model(input_ids=ids, attention_mask=att, use_cache=False).logits


class RowScorer:
    """Teacher logits for selected (sequence, position) rows of a batch, without [B, T, V] logits if possible.

    Fast path: run the decoder body for hidden states and apply the model's own head (lm_head plus its logit
    scaling / soft-capping, `distill.models.head`) to the trained rows only, a chunk at a time. Prompt positions
    and padding never reach lm_head, and peak memory is one chunk of rows x vocabulary, not B x T x V.
    The head is checked against the model's own forward once; a model whose forward does something the
    head does not reproduce falls back to full logits.
    """

    def __init__(self, model, probe: Sequence[int], pad_id: int, device):
        from distill.models.head import verify_head

        self.model, self.pad_id, self.device = model, pad_id, device
        self.fast = True
        probe = list(probe)[:16] or [pad_id]
        try:
            ids, att = _pad([probe], pad_id, device)
            tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2
            verify_head(model, ids, att, atol=tol)
        except DistillError:
            self.fast = False

    @torch.no_grad()
    def topk(self, seqs, positions, vocab: int, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [R, k], log-probs [R, k]) for the rows `positions` (a list of position arrays per sequence)."""
        b_idx = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(positions)]).to(self.device)
        t_idx = torch.cat([torch.as_tensor(p, dtype=torch.long) for p in positions]).to(self.device)
        if not self.fast:
            logits = teacher_forward(self.model, seqs, self.pad_id, self.device)
            rows = logits[b_idx.to(logits.device), t_idx.to(logits.device)]
            del logits
            return topk_logprobs(rows, vocab, k, temperature)
        from distill.models.head import model_hidden_and_head

        ids, att = _pad(seqs, self.pad_id, self.device)
        hidden, head = model_hidden_and_head(self.model, ids, att)
        # with --device-map the last layer may sit on another GPU than the first one (self.device)
        rows = hidden[b_idx.to(hidden.device), t_idx.to(hidden.device)]
        del hidden
        R = rows.shape[0]
        out_ids = torch.empty((R, k), dtype=torch.int64, device=rows.device)
        out_lp = torch.empty((R, k), dtype=torch.float32, device=rows.device)
        chunk = max(16, (1 << 25) // max(vocab, 1))  # ~128 MB of fp32 logits per chunk
        for a in range(0, R, chunk):
            i, v = topk_logprobs(head(rows[a:a + chunk]), vocab, k, temperature, chunk=chunk)
            out_ids[a:a + chunk], out_lp[a:a + chunk] = i, v
        return out_ids, out_lp


    @torch.no_grad()
    def rows(self, seqs, positions, vocab: int, temperature: float, reduce) -> dict[str, torch.Tensor]:
        """`reduce` applied to the scaled logits of the rows `positions`, chunk by chunk (see reduce_logits)."""
        b_idx = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(positions)]).to(self.device)
        t_idx = torch.cat([torch.as_tensor(p, dtype=torch.long) for p in positions]).to(self.device)
        chunk = max(16, (1 << 25) // max(vocab, 1))
        if not self.fast:
            logits = teacher_forward(self.model, seqs, self.pad_id, self.device)
            rows = logits[b_idx, t_idx]
            del logits
            return reduce_logits(rows, vocab, temperature, reduce, chunk=chunk)
        from distill.models.head import model_hidden_and_head

        ids, att = _pad(seqs, self.pad_id, self.device)
        hidden, head = model_hidden_and_head(self.model, ids, att)
        rows = hidden[b_idx, t_idx]
        del hidden
        parts = [reduce_logits(head(rows[a:a + chunk]), vocab, temperature, reduce, first_row=a, chunk=chunk)
                 for a in range(0, rows.shape[0], chunk)]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _logits_width(model) -> int:
    emb = model.get_output_embeddings()
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


class HFBackend:
    """A transformers teacher. See `teachers.backends` for the interface."""

    name = "hf"
    accept = ("dir", "gguf", "hub")

    def __init__(self, teacher: str, *, device=None, quant: str = "none", dtype: str | None = None,
                 trust_remote_code: bool = False, revision: str | None = None, device_map=None,
                 max_memory: dict | None = None):
        from distill.models import check_quant, load_tokenizer, parse_dtype, resolve_device, resolve_source

        check_quant(quant, flag="--teacher-quant")
        self.device = resolve_device(device)
        parse_dtype(dtype, device=self.device, flag="--teacher-dtype")  # a bad name fails before any load
        self.quant, self.dtype, self.revision, self.trust_remote_code = quant, dtype, revision, trust_remote_code
        self.device_map, self.max_memory = device_map, max_memory
        self.source = resolve_source(teacher, what="teacher", accept=self.accept)
        self._tokenizer = load_tokenizer(self.source, what="teacher", trust_remote_code=trust_remote_code,
                                         revision=revision, require_pad=True)
        self._model = None
        self._identity: dict | None = None
        self._scorer: RowScorer | None = None

    # ---- properties

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    @property
    def model(self):
        self.load()
        return self._model

    @property
    def logits_width(self) -> int:
        return _logits_width(self.model)

    @property
    def identity(self) -> dict:
        self.load()
        return dict(self._identity)

    @property
    def build_info(self) -> dict:
        model = self.model
        info = {"backend": self.name, "teacher_dtype": str(next(model.parameters()).dtype),
                "scoring": "hidden+head on trained rows" if self._scorer.fast else "full logits"}
        if self.device_map is not None:  # where the layers went (placement, not identity: not compared on resume)
            placed = getattr(model, "hf_device_map", None) or {}
            info["device_map"] = {"asked": self.device_map, "devices": sorted({str(d) for d in placed.values()})}
        return info

    # ---- operations

    def load(self) -> None:
        """Load the weights (once) and check the output head the fast scoring path relies on."""
        if self._model is not None:
            return
        from distill.models import load_model, model_identity

        model = load_model(self.source, what="teacher", quant=self.quant, device=self.device, dtype=self.dtype,
                           trust_remote_code=self.trust_remote_code, revision=self.revision,
                           device_map=self.device_map, max_memory=self.max_memory)
        self._model = model
        self._identity = model_identity(model, self.source, quant=self.quant, revision=self.revision) | {"backend": self.name}
        probe = self._tokenizer(_HEAD_PROBE_TEXT, add_special_tokens=False)["input_ids"]
        self._scorer = RowScorer(model, probe, int(self._tokenizer.pad_token_id), next(model.parameters()).device)

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], *, temperature: float, top_p: float,
                 max_new_tokens: int, batch_size: int | None = None, batch_tokens: int | None = None,
                 on_step=None, on_row=None) -> list:
        from distill.models.sampling import generate_rows

        return generate_rows(self.model, self._tokenizer, prompt_ids, seeds, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, batch_tokens=batch_tokens,
                             on_step=on_step, on_row=on_row)

    def score(self, seqs, positions, *, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.load()
        ids, lps = self._scorer.topk(seqs, positions, self.vocab_size, k, temperature)
        return ids.cpu(), lps.cpu()

    def score_rows(self, seqs, positions, *, temperature: float, reduce) -> dict[str, torch.Tensor]:
        self.load()
        out = self._scorer.rows(seqs, positions, self.vocab_size, temperature, reduce)
        return {key: t.cpu() for key, t in out.items()}
