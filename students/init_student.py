"""Make a student from the teacher by keeping a subset of its decoder layers (Minitron-style depth pruning).

When no smaller model of the teacher's family exists, a layer subset of the teacher is the cheapest
student with the *same tokenizer* (so the cache's top-k ids need no mapping), and it starts much closer
to the teacher than a random model. The result is a plain model directory (safetensors + config +
the teacher's tokenizer) that any later step loads like any model directory.

The config is rebuilt, not patched in place: `num_hidden_layers` and every per-layer list
(`layer_types`, sliding-window lists, ...) are cut to the kept layers, and the model is instantiated
from the new config so that each attention module gets its new `layer_idx` (the KV-cache slot) by
construction; the kept layers' weights are then copied in under their new indices.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError
from distill.io import atomic_directory
from distill.options import option, validate


@dataclass
class StudentInitConfig:
    """`distill student init` and the `[student]` section of a run config (declared once)."""

    teacher: str = option(help="Teacher model directory (or hub id).")
    out: Path = option(help="New model directory for the student.")
    keep_layers: str = option("every:2", "Layers to keep: every:N, first:N, last:N, a list like 0,2,4-7, or "
                              "importance:N (the N layers whose removal changes the teacher's output most on --calibration).")
    calibration: Path | None = option(None, "Records (JSONL: prompt+completion, messages or text) on which importance:N "
                                      "measures each layer's removal as KL(teacher || teacher without it).")
    calibration_samples: int = option(16, "Records of --calibration used (the first N).", minimum=1)
    calibration_max_length: int = option(256, "Tokens per calibration record (longer ones are cut).", minimum=8)
    importance_rounds: int = option(1, "importance:N drops its layers in this many rounds, rescoring the remaining "
                                    "layers after each (1 = one pass, as Minitron; more costs more forwards).", minimum=1)
    trust_remote_code: bool = option(False, "Allow the teacher's model directory to run its own code.")

    def check(self, name) -> None:
        if self.keep_layers.strip().startswith("importance:") and self.calibration is None:
            raise DistillError(f"{name('keep_layers')} importance:N needs {name('calibration')} FILE "
                               "(records on which each layer's removal is measured)")


def importance_count(spec: str, num_layers: int) -> int | None:
    """N of `importance:N` (checked against the teacher's depth), or None for the other forms."""
    s = spec.strip().replace(" ", "")
    if not s.startswith("importance:"):
        return None
    try:
        n = int(s.split(":", 1)[1])
    except ValueError:
        raise DistillError(f"cannot parse --keep-layers {spec!r}; importance:N needs a whole number N") from None
    if n < 1 or n > num_layers:
        raise DistillError(f"--keep-layers {spec}: the teacher has {num_layers} layers; importance:N needs 1 <= N <= {num_layers}")
    return n


def parse_keep_layers(spec: str, num_layers: int) -> list[int]:
    """Indices of the layers to keep, sorted. SPEC: `every:N`, `first:N`, `last:N`, or `0,2,4-7`
    (`importance:N` needs the model and is resolved by `importance_keep`)."""
    s = spec.strip().replace(" ", "")
    if not s:
        raise DistillError("--keep-layers is empty; use e.g. every:2, first:6, last:6, importance:6 or 0,2,4-7")
    if s.startswith("importance:"):
        raise DistillError(f"--keep-layers {spec} is chosen from the model on calibration data, not parsed alone")
    try:
        if s.startswith("every:"):
            n = int(s.split(":", 1)[1])
            if n < 1:
                raise ValueError
            keep = list(range(0, num_layers, n))
        elif s.startswith("first:"):
            n = int(s.split(":", 1)[1])
            if n < 1 or n > num_layers:
                raise DistillError(f"--keep-layers {spec}: the teacher has {num_layers} layers; first:N needs 1 <= N <= {num_layers}")
            keep = list(range(n))
        elif s.startswith("last:"):
            n = int(s.split(":", 1)[1])
            if n < 1 or n > num_layers:
                raise DistillError(f"--keep-layers {spec}: the teacher has {num_layers} layers; last:N needs 1 <= N <= {num_layers}")
            keep = list(range(num_layers - n, num_layers))
        else:
            keep = []
            for part in s.split(","):
                if re.fullmatch(r"\d+", part):
                    keep.append(int(part))
                elif re.fullmatch(r"\d+-\d+", part):
                    a, b = (int(x) for x in part.split("-"))
                    if b < a:
                        raise ValueError
                    keep.extend(range(a, b + 1))
                else:
                    raise ValueError
    except ValueError:
        raise DistillError(f"cannot parse --keep-layers {spec!r}; use every:N, first:N, last:N or a list like 0,2,4-7") from None
    bad = [i for i in keep if i < 0 or i >= num_layers]
    if bad:
        raise DistillError(f"--keep-layers {spec}: layer {bad[0]} does not exist (the teacher has layers 0..{num_layers - 1})")
    keep = sorted(set(keep))
    if not keep:
        raise DistillError(f"--keep-layers {spec} keeps no layer")
    return keep


def _decoder_layers_prefix(model, num_layers: int) -> str:
    """State-dict prefix of the decoder-layer ModuleList (e.g. `model.layers`)."""
    import torch

    candidates = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers and n]
    if not candidates:
        raise DistillError(f"cannot find the {num_layers} decoder layers of this model; layer pruning supports standard decoder-only models")
    # The shortest name is the top-level stack (vision towers etc. live deeper).
    return min(candidates, key=lambda n: (n.count("."), len(n)))


def pruned_config(config, keep: list[int]):
    """A copy of `config` with `num_hidden_layers` and every per-layer list cut to `keep`."""
    import copy

    new = copy.deepcopy(config)
    n = config.num_hidden_layers
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and key not in ("architectures",):
            setattr(new, key, type(value)(value[i] for i in keep))
    new.num_hidden_layers = len(keep)
    # max_window_layers (Qwen2): layers below this index use full attention; remap to the new count.
    if isinstance(getattr(config, "max_window_layers", None), int):
        new.max_window_layers = sum(1 for i in keep if i < config.max_window_layers)
    return new


def init_student(teacher: str | Path, out: str | Path, *, overwrite: bool = False, **settings) -> dict:
    """Write a layer-subset student of `teacher` to `out`. Returns a summary dict.

    `settings` are the other `StudentInitConfig` fields (keep_layers, trust_remote_code): their defaults
    and checks live there, once for the CLI, the run config and this call.
    """
    from distill.models import load_model, load_tokenizer, model_from_config, resolve_source

    cfg = validate(StudentInitConfig(teacher=str(teacher), out=Path(out), **settings))
    teacher, out, keep_layers, trust_remote_code = cfg.teacher, cfg.out, cfg.keep_layers, cfg.trust_remote_code
    source = resolve_source(teacher, what="teacher")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DistillError(f"{out} already exists and is not empty; pick a new --out directory")
    tokenizer = load_tokenizer(source, what="teacher", trust_remote_code=trust_remote_code)
    model = load_model(source, what="teacher", device="cpu", dtype="auto", trust_remote_code=trust_remote_code,
                       compute=False)  # weights are copied, not run: keep the checkpoint's dtype
    if getattr(model.config, "quantization_config", None) is not None:
        raise DistillError(f"teacher {teacher} is quantized; layer pruning needs a full-precision model directory")
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = text_config.num_hidden_layers
    prefix = _decoder_layers_prefix(model, num_layers)
    importance = None
    n_importance = importance_count(keep_layers, num_layers)
    if n_importance is not None:
        batches = calibration_batches(tokenizer, cfg.calibration, cfg.calibration_samples, cfg.calibration_max_length)
        keep, importance = importance_keep(model, model.get_submodule(prefix), batches, n_importance,
                                           rounds=cfg.importance_rounds)
    else:
        keep = parse_keep_layers(keep_layers, num_layers)

    new_config = pruned_config(model.config, keep)
    if text_config is not model.config:  # multimodal wrapper: prune the text config inside it
        raise DistillError("layer pruning of multimodal teachers is not supported; pass a text-only causal LM")
    new_index = {old: new for new, old in enumerate(keep)}
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    for key, tensor in model.state_dict().items():
        m = pat.match(key)
        if m is None:
            state[key] = tensor
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = tensor
    dtype = next(model.parameters()).dtype
    del model
    student = model_from_config(new_config, dtype=dtype, trust_remote_code=trust_remote_code)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = bool(getattr(new_config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise DistillError(f"pruned weights do not fit the pruned model (missing {missing[:2]}, unexpected {unexpected[:2]})")
    student.eval()

    with atomic_directory(out) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in student.parameters())
    summary = {"teacher": teacher, "out": str(out), "kept_layers": keep, "teacher_layers": num_layers,
               "student_layers": len(keep), "parameters": params}
    if importance is not None:
        summary["importance"] = {**importance, "calibration": str(cfg.calibration)}
    return summary


# ---- importance:N ----------------------------------------------------------------------------------

def calibration_batches(tokenizer, path, samples: int, max_length: int, batch_size: int = 8) -> list[tuple]:
    """(input_ids, attention_mask, scored) batches of the first `samples` calibration records; `scored`
    marks the positions whose next-token distribution is compared: the trained (completion) tokens of
    the record, as the cache builder and the trainer tokenize it, so that importance is measured where
    the student will be trained."""
    import torch

    from distill.data.records import load_records, tokenize_record

    if not Path(path).is_file():
        raise DistillError(f"--calibration {path} is not a file")
    records = load_records(path, limit=samples)
    enc = []
    for r in records:
        ids, mask = tokenize_record(tokenizer, r, max_length=max_length)
        if sum(mask[1:]):
            enc.append((ids, mask))
    if not enc:
        raise DistillError(f"--calibration {path}: no record has a trained token within {max_length} tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for a in range(0, len(enc), batch_size):
        part = enc[a:a + batch_size]
        T = max(len(i) for i, _ in part)
        ids = torch.full((len(part), T), int(pad), dtype=torch.long)
        att = torch.zeros((len(part), T), dtype=torch.long)
        scored = torch.zeros((len(part), T), dtype=torch.bool)
        for b, (i, m) in enumerate(part):
            ids[b, :len(i)] = torch.tensor(i)
            att[b, :len(i)] = 1
            scored[b, :len(i) - 1] = torch.tensor(m[1:], dtype=torch.bool)  # position t predicts token t+1
        out.append((ids, att, scored))
    return out


def _skip(layer):
    """Make `layer` the identity (its output is its input hidden states) until the handle is removed.
    A forward hook rather than a rebuilt model: scoring 30 candidate removals then costs 30 forwards
    and no copies; the residual stream simply passes the layer by."""

    def hook(module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return layer.register_forward_hook(hook, with_kwargs=True)


def removal_kl(model, layers, batches, reference, drop) -> float:
    """Mean KL(reference || model with the layers in `drop` skipped) over the scored positions, nats."""
    import torch

    handles = [_skip(layers[i]) for i in drop]
    try:
        total, n = 0.0, 0
        with torch.no_grad():
            for (ids, att, scored), lp in zip(batches, reference):
                lq = torch.log_softmax(model(input_ids=ids, attention_mask=att, use_cache=False).logits[scored].double(), -1)
                total += float((lp.exp() * (lp - lq)).sum())
                n += int(scored.sum())
    finally:
        for h in handles:
            h.remove()
    return total / max(n, 1)


def _progress(items, desc: str):
    """A progress bar on stderr: scoring every layer of a 30-layer teacher takes minutes on a CPU."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="layer", file=sys.stderr, dynamic_ncols=True, leave=False)


def _layer_output(out, h):
    """`h` in the format a decoder layer returns (a tensor, or a tuple in older transformers)."""
    return (h, *out[1:]) if isinstance(out, tuple) else h


@contextmanager
def _layers_replaced(layers, forwards: dict):
    """Layer j runs `forwards[j]` (any arguments -> the layer's output) instead of its own forward."""
    previous = {j: layers[j].__dict__.get("forward") for j in forwards}
    for j, fn in forwards.items():
        layers[j].forward = fn
    try:
        yield
    finally:
        for j, fn in previous.items():
            if fn is None:
                del layers[j].forward
            else:
                layers[j].forward = fn


def _identity_like(out):
    def forward(*args, **kwargs):
        return _layer_output(out, args[0] if args else kwargs["hidden_states"])

    return forward


def _scored_logprobs(model, ids, att, scored, row_head: bool):
    """log-softmax of the logits at the scored positions (float64); `row_head`: only those rows go
    through the output head (`ModelHead`), instead of the model's full [B, T, V] logits."""
    import torch

    from distill.models.head import model_hidden_and_head

    if row_head:
        hidden, head = model_hidden_and_head(model, ids, att)
        logits = head(hidden[scored])
    else:
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[scored]
    return torch.log_softmax(logits.double(), -1)


def _kl_sum(lp, lq) -> float:
    return float((lp.exp() * (lp - lq)).sum())


def _round_scores_replayed(model, layers, batches, reference, dropped, remaining, row_head, progress) -> dict:
    """KL of removing each remaining layer, given `dropped`, running only the layers after it.

    Removing layer i leaves the layers before it unchanged, so one forward records what each layer
    outputs (dropped layers pass their input through), and the forward without layer i replays the
    recorded outputs of layers < i and computes only layers > i: on average half the layers of a
    full forward per candidate. Deterministic kernels on the same inputs give the same numbers as
    running every layer (`removal_kl`)."""
    import torch

    outs: list[dict] = []
    with torch.no_grad():
        for ids, att, scored in batches:
            seen: dict = {}
            handles = [_skip(layers[j]) for j in dropped]  # first: the recording hooks see their output
            handles += [layers[j].register_forward_hook(lambda m, a, o, j=j: seen.__setitem__(j, o))
                        for j in range(len(layers))]
            try:
                _scored_logprobs(model, ids, att, scored, row_head)
            finally:
                for h in handles:
                    h.remove()
            outs.append(seen)
    scores = {}
    with torch.no_grad():
        for i in progress(remaining):
            total, n = 0.0, 0
            for (ids, att, scored), lp, seen in zip(batches, reference, outs):
                forwards = {j: (lambda *a, o=seen[j], **k: o) for j in range(i)}
                forwards[i] = _identity_like(seen[i])
                forwards.update({j: _identity_like(seen[j]) for j in dropped if j > i})
                with _layers_replaced(layers, forwards):
                    lq = _scored_logprobs(model, ids, att, scored, row_head)
                total += _kl_sum(lp, lq)
                n += int(scored.sum())
            scores[i] = total / max(n, 1)
    return scores


def importance_keep(model, layers, batches, n_keep: int, *, rounds: int = 1, replay: bool = True) -> tuple[list[int], dict]:
    """The `n_keep` layers to keep: drop those whose removal changes the model's output least.

    Each remaining layer is scored by KL(full model || model without that layer, given the layers
    already dropped) on the calibration positions; the lowest-scoring layers are dropped, in `rounds`
    rounds of about equal size (rounds=1 scores every layer once on the full model, the Minitron
    depth-pruning criterion with KL as the metric). Returns (kept indices, {"scores": per-round
    {layer: KL}, "dropped": [...], "rounds": rounds}).

    `replay` (the default) reuses the outputs of the layers before each candidate and applies the
    output head to the scored positions only (when `check_head` finds the model's head rebuildable);
    `replay=False` runs one whole forward per candidate (the reference the fast path is tested against).
    """
    import torch

    from distill.models.head import CHUNKED_HEAD, check_head

    was_training = model.training
    model.eval()
    row_head = False
    if replay:
        ids, att, _ = batches[0]
        row_head = check_head(model, ids[:1], att[:1]).path == CHUNKED_HEAD
    with torch.no_grad():
        reference = [_scored_logprobs(model, i, a, s, row_head) for i, a, s in batches]
    L = len(layers)
    to_drop = L - n_keep
    rounds = max(1, min(rounds, to_drop)) if to_drop else 1
    dropped: list[int] = []
    history = []
    for r in range(rounds if to_drop else 0):
        count = to_drop * (r + 1) // rounds - to_drop * r // rounds
        remaining = [i for i in range(L) if i not in dropped]
        desc = f"layer importance, round {r + 1}/{rounds}"
        if replay:
            scores = _round_scores_replayed(model, layers, batches, reference, dropped, remaining, row_head,
                                            lambda items: _progress(items, desc))
        else:
            scores = {i: removal_kl(model, layers, batches, reference, dropped + [i]) for i in _progress(remaining, desc)}
        history.append({str(i): round(v, 6) for i, v in scores.items()})
        dropped += sorted(remaining, key=lambda i: (scores[i], i))[:count]
    model.train(was_training)
    keep = sorted(i for i in range(L) if i not in dropped)
    return keep, {"scores": history, "dropped": sorted(dropped), "rounds": rounds}
