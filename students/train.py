"""The student trainer: a quantized LoRA student trained on the teacher cache with the chunked KD loss.

One optimizer step = `grad_accum` micro-batches. The loss of every micro-batch is a SUM over its valid
tokens divided by the number of valid tokens in the WHOLE step (counted before the first backward), so
k micro-batches give exactly the gradient of one batch of k (docs/losses.md; torchtune and axolotl
both shipped this wrong).

Determinism and resume: the data order of epoch e is a permutation drawn from `seed + e` by its own
generator, and micro-batches are formed from it deterministically, so a data position is just
(epoch, micro-batch index). Checkpoints store it with the adapters, optimizer, scheduler and RNG
states (`students/checkpoint.py`), and `--resume` replays the same per-step losses as a run that was
never interrupted (tested with a real SIGKILL).

Processes: under `accelerate launch` every process runs `train`. The flags describe the GLOBAL batch of
a step; `students/distributed.py` divides each step's micro-batches (or their rows) among the
processes, the normaliser and every logged figure are summed over them, and the main process alone
writes the run directory. `train` reads top to bottom: `prepare` (checks, data, run directory,
student, optimizer, resume), `train_loop` (the steps), `finish` (final evaluation, summary, adapters).

The run directory:
    run.json           the resolved config (student, quant, LoRA, cache + manifest fingerprint, loss) and
                       the head check (chunked head or full logits, `distill.models.head.check_head`)
    metrics.jsonl      one JSON object per step ("train") and per evaluation ("eval")
    checkpoints/step-XXXXXX/
    final/             adapters + tokenizer + summary.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from distill.errors import DistillError
from distill.io import atomic_write_json, atomic_write_text, holds_only_partial_writes, sweep_partial_writes
from distill.models.quant import QUANT_CHOICES
from distill.options import option, plain_dict, validate

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOSS_CHOICES = ("forward-kl", "forward-kl-renorm", "reverse-kl", "jsd")
TAIL_RULES = ("uniform", "bucket")  # distill.losses.TAIL_RULES (a test keeps them equal; losses imports torch)
OPTIMIZERS = ("auto", "adamw", "paged-adamw-8bit")
# Config fields that may change between a run and its --resume (they do not change the numbers).
RESUMABLE_CHANGES = ("resume", "eval_every", "save_every", "keep_checkpoints", "progress", "log_every")


@dataclass
class TrainConfig:
    """Everything `distill train` and the `[train]` section of a run config take (declared once:
    `distill.options` derives the CLI options and the config keys from these fields)."""

    student: str = option(help="Student model directory or hub id.")
    cache: str = option(help="Teacher cache directory (from `distill cache build`).")
    out: Path = option(help="Run directory (run.json, metrics.jsonl, checkpoints/, final/).")
    # student
    quant: str = option("nf4", "Base weights: nf4 (4-bit, double quant), int8, or none.", choices=QUANT_CHOICES)
    lora_r: int = option(16, "LoRA rank.", minimum=1)
    lora_alpha: int = option(32, "LoRA alpha (the adapters are scaled by alpha / r).", exclusive_minimum=0)
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.", minimum=0, exclusive_maximum=1)
    lora_targets: list[str] | None = option(None, "Comma-separated module names (default: all linear layers).", sep=",")
    gradient_checkpointing: bool = option(True, "Recompute activations in the backward pass (less memory, more compute; "
                                                "which layers: --checkpoint-layers).")
    checkpoint_layers: str = option("lean", "With gradient checkpointing: all | every:N | lean | lean+every:N. every:N: "
                                               "every N-th decoder layer recomputes whole; lean: the other layers recompute "
                                               "only their cheap elementwise activations (MLP product, norms, LoRA dropout) "
                                               "instead of storing them.")
    trust_remote_code: bool = option(False, "Allow the student's model directory to run its own code.")
    init_adapter: str | None = option(None, "Start from the LoRA adapters saved in this directory (a run's final/ or a "
                                            "checkpoint; same LoRA settings) instead of fresh ones.")
    # loss
    loss: str = option("forward-kl", "forward-kl (top-k + tail), forward-kl-renorm, reverse-kl or jsd.", choices=LOSS_CHOICES)
    temperature: float | None = option(None, "Training temperature (KD term scaled by T^2); default: the cache's. "
                                       "Another one needs --retemper-tail.", exclusive_minimum=0)
    retemper_tail: str | None = option(None, "Accept a temperature other than the cache's, re-tempering the teacher's "
                                       "tail as: uniform (recommended, spread over the uncached tokens) or bucket (one token).",
                                       choices=TAIL_RULES)
    kd_weight: float = option(1.0, "Weight of the distillation term.", minimum=0)
    ce_weight: float = option(0.0, "Weight of cross-entropy on the completion tokens.", minimum=0)
    jsd_beta: float = option(0.5, "Mixing weight of --loss jsd.", exclusive_minimum=0, exclusive_maximum=1)
    loss_chunk_size: int | None = option(None, "Rows of logits per loss chunk (default: automatic, <= 256 MiB of fp32 logits).",
                                         minimum=1)
    # schedule
    steps: int | None = option(None, "Optimizer steps (default: --epochs, or one epoch).", minimum=1)
    epochs: float | None = option(None, "Passes over the training samples (instead of --steps).", exclusive_minimum=0)
    lr: float = option(2e-4, "Peak learning rate (cosine schedule).", exclusive_minimum=0)
    weight_decay: float = option(0.0, "AdamW weight decay.", minimum=0)
    warmup_steps: int | None = option(None, "Linear warm-up steps (default: --warmup-ratio of the steps).", minimum=0)
    warmup_ratio: float = option(0.03, "Warm-up share of the steps when --warmup-steps is not given.", minimum=0, maximum=1)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).", minimum=0)
    optimizer: str = option("auto", "auto (paged 8-bit AdamW on CUDA, AdamW on CPU), adamw, paged-adamw-8bit.", choices=OPTIMIZERS)
    # data
    batch_size: int | None = option(None, "Sequences per micro-batch (default 8).", minimum=1)
    batch_tokens: int | None = option(None, "Padded tokens per micro-batch (instead of --batch-size), or auto: the largest "
                                      "that `distill plan` fits in this GPU's free memory (CPU: half the available RAM).",
                                      minimum=1, auto=True)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", minimum=1)
    max_length: int | None = option(None, "Cut every cached sample to this many tokens (default: as cached).", minimum=2)
    eval_fraction: float = option(0.05, "Held-out share of the cache (deterministic split).", minimum=0, exclusive_maximum=1)
    eval_samples: int | None = option(None, "Cap on held-out samples evaluated.", minimum=0)
    eval_batch_size: int = option(8, "Sequences per evaluation batch.", minimum=1)
    eval_every: int = option(50, "Evaluate every N steps (0: only at the end).", minimum=0)
    save_every: int = option(100, "Checkpoint every N steps (0: never).", minimum=0)
    keep_checkpoints: int = option(2, "Checkpoints kept on disk (the newest).", minimum=1)
    seed: int = option(0, "Seed of the data order, the held-out split and the adapters' initialisation.")
    log_every: int = option(1, "Write a metrics line every N steps (0: never).", minimum=0)
    progress: bool = option(True, "Show a progress bar.")
    resume: bool = option(False, "Continue the run in --out from its last checkpoint.")

    def check(self, name) -> None:
        """Rules across fields (each field's own bounds and choices are declared above)."""
        if self.steps is not None and self.epochs is not None:
            raise DistillError(f"give either {name('steps')} or {name('epochs')}, not both")
        if self.batch_size is not None and self.batch_tokens is not None:
            raise DistillError(f"give either {name('batch_size')} or {name('batch_tokens')}, not both")
        if self.kd_weight + self.ce_weight == 0:
            raise DistillError(f"{name('kd_weight')} and {name('ce_weight')} must not both be 0: nothing would be trained")
        from students.model import CHECKPOINT_LAYERS_HELP, checkpoint_every

        try:
            checkpoint_every(self.checkpoint_layers)
        except DistillError:
            raise DistillError(f"{name('checkpoint_layers')} {self.checkpoint_layers!r} is not one of: "
                               f"{CHECKPOINT_LAYERS_HELP}") from None

    def to_dict(self) -> dict:
        return plain_dict(self)


# ---- validation ---------------------------------------------------------------------------------

def _validate(cfg: TrainConfig) -> None:
    validate(cfg)


# ---- data plan ----------------------------------------------------------------------------------

def make_micro_batches(indices: Sequence[int], lengths: Sequence[int], *, epoch: int, seed: int,
                       batch_size: int | None, batch_tokens: int | None, shuffle: bool = True) -> list[list[int]]:
    """Micro-batches (lists of dataset indices) of one epoch, a pure function of (seed, epoch).

    With `batch_tokens`, samples are taken in shuffled order and a micro-batch closes when one more
    sample would make B * max_len (padded tokens) exceed the budget; a longer sample alone still forms
    a batch. Without either option, batch size 8.
    """
    import torch

    order = list(indices)
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        perm = torch.randperm(len(order), generator=g).tolist()
        order = [order[i] for i in perm]
    batches: list[list[int]] = []
    if batch_tokens is None:
        bs = batch_size or 8
        return [order[i:i + bs] for i in range(0, len(order), bs)]
    cur: list[int] = []
    cur_max = 0
    for i in order:
        L = int(lengths[i])
        new_max = max(cur_max, L)
        if cur and new_max * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, new_max = [], L
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


class DataPlan:
    """Endless, resumable stream of micro-batches over the training indices."""

    def __init__(self, indices, lengths, cfg: TrainConfig):
        self.indices, self.lengths, self.cfg = list(indices), lengths, cfg
        self._cache: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            self._cache = {epoch: make_micro_batches(self.indices, self.lengths, epoch=epoch, seed=self.cfg.seed,
                                                     batch_size=self.cfg.batch_size, batch_tokens=self.cfg.batch_tokens)}
        return self._cache[epoch]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def stream(self, epoch: int, index: int) -> Iterator[tuple[int, int, list[int]]]:
        """Yield (epoch, index, batch) from the given position on, rolling over epochs."""
        while True:
            batches = self.epoch_batches(epoch)
            while index < len(batches):
                yield epoch, index, batches[index]
                index += 1
            epoch, index = epoch + 1, 0


# ---- run directory ------------------------------------------------------------------------------

def _identity(d: dict) -> dict:
    # "head" is an outcome of the run (the head check), not a setting: it is re-checked on resume.
    return {k: v for k, v in d.items() if k not in RESUMABLE_CHANGES and k not in ("config", "head")} | {
        "config": {k: v for k, v in d.get("config", {}).items() if k not in RESUMABLE_CHANGES}}


def _prepare_run_dir(out: Path, run_record: dict, resume: bool) -> bool:
    """Create or check the run directory. Returns True when resuming an existing run."""
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise DistillError(f"--out {out} is a file; give a directory for the run")
    if run_file.is_file():
        try:
            existing = json.loads(run_file.read_text())
        except ValueError:
            raise DistillError(f"{run_file} is not valid JSON; choose a new --out directory") from None
        if not resume:
            raise DistillError(f"{out} already holds a training run; pass --resume to continue it or choose a new --out")
        if _identity(existing) != _identity(run_record):
            diff = sorted(k for k in set(existing.get("config", {})) | set(run_record["config"])
                          if k not in RESUMABLE_CHANGES and existing.get("config", {}).get(k) != run_record["config"].get(k))
            what = ", ".join(diff[:4]) or "cache/student fingerprint"
            raise DistillError(f"{out} holds a run with a different config ({what}); resume it with the same settings or choose a new --out")
        return True
    if out.is_dir() and not holds_only_partial_writes(out):
        raise DistillError(f"--out {out} is not empty and holds no training run; choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    sweep_partial_writes(out)  # a run killed while writing its first run.json
    atomic_write_json(run_file, run_record, indent=1, sort_keys=True)
    return False


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log reads like one uninterrupted run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(l + "\n" for l in keep))


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


# ---- cache + student checks ---------------------------------------------------------------------

def open_cache(path: str | Path, tokenizer, *, k: int | None = None, verify: bool = True):
    """Open and verify the cache for this student: refuse missing, corrupt, or other-tokenizer caches.

    `verify=False` skips the checksums (the other processes of a multi-process run: one reads them all)."""
    from distill.cache.format import read_manifest, tokenizer_fingerprint

    path = Path(path)
    if not path.exists():
        raise DistillError(f"cache {path} does not exist; build it with `distill cache build`")
    manifest = read_manifest(path)
    if verify:
        _verify(path)
    fp = tokenizer_fingerprint(tokenizer)
    if fp != manifest.tokenizer_fingerprint:
        raise DistillError(
            f"cache {path} was built with another tokenizer than the student's "
            f"({manifest.tokenizer_fingerprint[:19]}... vs {fp[:19]}...); use a student that shares the teacher's tokenizer"
        )
    from distill.cache.reader import CacheReader

    reader = CacheReader(path, expect_fingerprint=fp, expect_k=k)
    return reader, manifest


def _verify(path: Path) -> None:
    """Run the cache module's full verification (checksums, shapes) when it is available."""
    try:
        from distill.cache.verify import verify_cache  # type: ignore
    except ImportError:
        try:
            from distill.cache.reader import verify_cache  # type: ignore
        except ImportError:
            return
    result = verify_cache(path)
    # verify_cache raises DistillError on failure; accept a report object with ok/errors as well.
    ok = getattr(result, "ok", None)
    if ok is False or (isinstance(result, dict) and result.get("ok") is False):
        errors = getattr(result, "errors", None) or (result.get("errors") if isinstance(result, dict) else None) or ["verification failed"]
        raise DistillError(f"cache {path} fails verification: {errors[0]}; rebuild it with `distill cache build`")


def truncate_sample(sample: dict, max_length: int | None) -> dict:
    """A cached sample cut to its first `max_length` tokens: input_ids and loss_mask, and only the teacher
    rows of positions t < max_length - 1 (the row of t predicts token t+1, which must still be inside).

    Rows are stored for increasing positions, so the kept rows are a prefix of the sample's rows.
    """
    ids = sample["input_ids"]
    if max_length is None or int(ids.shape[0]) <= max_length:
        return sample
    import torch

    positions = sample.get("positions")
    if positions is None:
        positions = torch.nonzero(torch.as_tensor(sample["loss_mask"]).bool()[1:]).flatten()
    n_rows = int((positions < max_length - 1).sum())
    from distill.cache.target import BATCH_KEYS

    rows = {key: sample[key][:n_rows] for key in BATCH_KEYS if sample.get(key) is not None}
    return {**sample, "input_ids": ids[:max_length], "loss_mask": sample["loss_mask"][:max_length],
            "positions": positions[:n_rows], **rows}


class TruncatedDataset:
    """Every sample of `dataset` cut by `truncate_sample` (training and held-out evaluation alike)."""

    def __init__(self, dataset, max_length: int):
        self.dataset, self.max_length = dataset, int(max_length)
        self.lengths = [min(L, self.max_length) for L in sample_lengths(dataset)]

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return truncate_sample(self.dataset[i], self.max_length)


def sample_lengths(dataset) -> list[int]:
    """Token length of every sample (needed for token-budget batching)."""
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None:
        return list(lengths)
    return [int(dataset[i]["input_ids"].shape[0]) for i in range(len(dataset))]


# ---- loss glue ----------------------------------------------------------------------------------

def training_temperature(cfg: TrainConfig, cache_temperature: float, codec=None) -> float:
    """T_train: `cfg.temperature`, or the cache's when None, checked by the cache's codec (`codec`, default
    top-k): for top-k a temperature other than the cache's is refused unless `cfg.retemper_tail` names
    how to re-temper the tail bucket (the k cached tokens re-temper exactly, the tail only
    approximately, docs/losses.md); a sampled codec refuses any other temperature, and any loss but
    forward-kl."""
    T_store = float(cache_temperature)
    T = T_store if cfg.temperature is None else float(cfg.temperature)
    from distill.cache.codecs.topk import TopKCodec

    check = codec.check_training if codec is not None else TopKCodec.check_temperature_rule
    check(temperature=T, cache_temperature=T_store, tail_rule=cfg.retemper_tail, loss=cfg.loss)
    return T


def loss_config(cfg: TrainConfig, vocab_size: int, cache_temperature: float = 1.0, codec=None):
    """The loss module's config for this run; `vocab_size` is the tokenizer length (wider logits -> -inf)."""
    from distill.losses import KDLossConfig

    extra = {"tail_rule": cfg.retemper_tail} if cfg.retemper_tail is not None else {}
    return KDLossConfig(kind=cfg.loss, temperature=training_temperature(cfg, cache_temperature, codec),
                        cache_temperature=float(cache_temperature), beta=cfg.jsd_beta, vocab_size=vocab_size,
                        chunk_size=cfg.loss_chunk_size, kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight, **extra)


def batch_loss_sums(model, batch: dict, loss_cfg, *, full_logits: bool = False):
    """LossSums of one micro-batch: final hidden states through the chunked head + sparse KD loss.

    `full_logits`: the model's own logits instead, for a model whose head check failed (`check_head`).
    """
    from distill.cache.target import SparseTarget
    from distill.losses import target_loss_sums
    from distill.models.head import rows_and_head

    rows, head = rows_and_head(model, batch, full_logits=full_logits)
    return target_loss_sums(rows, head, batch["targets"], SparseTarget.from_dict(batch), loss_cfg)


def check_student_head(model, sample: dict, accelerator):
    """Check the chunked head against the model's own logits on the first tokens of a training sample.

    Runs under the training autocast, so it compares the numbers training will compute.
    """
    from distill.models.head import HEAD_CHECK_TOKENS, check_head

    ids = sample["input_ids"][:HEAD_CHECK_TOKENS].to(accelerator.device)
    with accelerator.autocast():
        return check_head(model, ids)


# ---- optimizer ----------------------------------------------------------------------------------

def make_optimizer(params, cfg: TrainConfig, device):
    import torch

    kind = cfg.optimizer
    if kind == "auto":
        kind = "paged-adamw-8bit" if torch.device(device).type == "cuda" else "adamw"
    if kind == "paged-adamw-8bit":
        if torch.device(device).type != "cuda":
            raise DistillError("--optimizer paged-adamw-8bit needs a CUDA GPU; use adamw on the CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay), kind
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), kind


# ---- the run: prepare, loop, finish ------------------------------------------------------------

@dataclass
class Data:
    """The training data: samples, the held-out split, and what the loss needs to know of the cache."""

    dataset: object
    train_idx: list[int]
    eval_idx: list[int]
    pad_id: int
    manifest: object | None
    cache_temperature: float
    vocab_size: int


@dataclass
class Position:
    """Where a run is: optimizer steps done, and the next micro-batch (epoch, index in that epoch)."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0


@dataclass
class Run:
    """What `prepare` sets up for the loop and `finish` (in each process of a multi-process run)."""

    cfg: TrainConfig
    out: Path
    accelerator: object
    model: object  # the student and its loss (students.distributed.StudentLoss) as the engine wrapped it
    student: object  # the peft model inside: its adapters are what a checkpoint saves
    tokenizer: object
    optimizer: object
    scheduler: object
    opt_kind: str
    data: Data
    plan: DataPlan
    loss_cfg: object
    eval_cfg: object
    head_check: object
    null_batch: dict  # a batch with no trained token: the stand-in for a micro-batch a process has no rows of
    total_steps: int
    log: MetricsLog
    position: Position = field(default_factory=Position)
    finished: dict | None = None  # the summary of a run that --resume found already finished
    batch_plan: dict | None = None  # what --batch-tokens auto chose (students/auto_batch.py)


@dataclass
class Progress:
    """What the loop hands `finish`: the last evaluation, tokens trained on and seconds spent this session."""

    last_eval: dict | None = None
    tokens: int = 0
    seconds: float = 0.0


def train(cfg: TrainConfig, *, on_step_end: Callable[[int], None] | None = None, dataset=None) -> dict:
    """Train a student on the cache as `cfg` says; return the run summary (also in final/summary.json).

    `on_step_end(step)` is called after each optimizer step (and its checkpoint); tests use it to kill
    the process mid-run. `dataset` replaces the cache reader (tests with hand-made samples); the cache
    checks still run unless `cfg.cache` is empty. Under `accelerate launch` every process runs this.
    """
    run = prepare(cfg, dataset=dataset)
    if run.finished is not None:
        return run.finished
    progress = train_loop(run, on_step_end=on_step_end)
    return finish(run, progress)


def prepare(cfg: TrainConfig, *, dataset=None) -> Run:
    """Check the config, open the data, create or resume the run directory, build student and optimizer.

    Cheap checks first (tokenizer, cache, run dir), the model load last: a bad input fails in seconds.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from distill.losses import KDLossConfig
    from distill.models import load_tokenizer
    from distill.ranks import destroy_group_at_exit
    from students import distributed as dist
    from students.model import LoraSettings, StudentSpec, load_student

    _validate(cfg)
    dist.die_with_launcher()
    out = Path(cfg.out)
    spec = StudentSpec(path=str(cfg.student), quant=cfg.quant,
                       lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_targets),
                       gradient_checkpointing=cfg.gradient_checkpointing, trust_remote_code=cfg.trust_remote_code,
                       checkpoint_layers=cfg.checkpoint_layers)
    # This process's place among those `accelerate launch` started (one process: the only one).
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no", cpu=not torch.cuda.is_available())
    destroy_group_at_exit()
    if dist.shards_weights(accelerator) and cfg.save_every:
        raise DistillError(f"checkpoints of a student sharded by {dist.engine_name(accelerator).upper()} are not supported yet; "
                           "pass --save-every 0 (the final adapters are saved)")
    tokenizer = load_tokenizer(spec.path, what="student", trust_remote_code=spec.trust_remote_code)
    data = _open_data(cfg, tokenizer, dataset, verify=accelerator.is_main_process)
    from distill.cache.codecs import codec_for_manifest

    # refuses a temperature (or loss) the cache's codec cannot serve, before the model loads
    loss_cfg = loss_config(cfg, data.vocab_size, data.cache_temperature,
                           codec_for_manifest(data.manifest) if data.manifest else None)
    # Held-out figures: forward KL at the cache temperature against the teacher as stored.
    eval_cfg = KDLossConfig(kind="forward-kl", temperature=data.cache_temperature, cache_temperature=data.cache_temperature,
                            vocab_size=data.vocab_size, chunk_size=cfg.loss_chunk_size)
    lengths = sample_lengths(data.dataset)
    batch_plan = None
    if cfg.batch_tokens == "auto":  # the largest batch the memory planner fits (students/auto_batch.py)
        from students.auto_batch import resolve_auto_batch

        k = data.manifest.k if data.manifest else int(data.dataset[0]["target_ids"].shape[-1])
        batch_plan = resolve_auto_batch(cfg, out, [lengths[i] for i in data.train_idx], top_k=k, device=accelerator.device)
        if cfg.progress and accelerator.is_main_process:
            print(batch_plan["message"], file=sys.stderr, flush=True)
    plan = DataPlan(data.train_idx, lengths, dataclasses.replace(cfg, batch_tokens=batch_plan["batch_tokens"]) if batch_plan else cfg)
    per_epoch = math.ceil(plan.batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil((cfg.epochs or 1.0) * plan.batches_per_epoch / cfg.grad_accum))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))
    run_record = _run_record(cfg, spec, data, loss_cfg, {
        "total_steps": total_steps, "warmup_steps": warmup, "steps_per_epoch": per_epoch,
        "train_samples": len(data.train_idx), "eval_samples": len(data.eval_idx)})
    if batch_plan is not None:
        run_record["batch_plan"] = batch_plan
    resuming = dist.on_main(accelerator, lambda: _prepare_run_dir(out, run_record, cfg.resume))

    set_seed(cfg.seed)  # the same LoRA initialisation in every process
    model, tokenizer = load_student(spec, device=accelerator.device, quant_storage=dist.quant_storage_for(accelerator, cfg.quant))
    if cfg.init_adapter:  # continue a trained student (on-policy rounds); a resumed checkpoint overrides it
        from students.model import load_adapter_weights

        load_adapter_weights(model, cfg.init_adapter)
    if accelerator.process_index > 0:
        set_seed(cfg.seed, device_specific=True)  # but each its own dropout masks (the first as in a one-process run)
    # Before the first step: train through the chunked head only if it reproduces the model's logits.
    head_check = check_student_head(model, data.dataset[data.train_idx[0]], accelerator)
    if accelerator.is_main_process:
        print(head_check.message(), file=sys.stderr, flush=True)
        atomic_write_json(out / RUN_FILE, {**json.loads((out / RUN_FILE).read_text()), "head": head_check.to_dict()},
                          indent=1, sort_keys=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, opt_kind = make_optimizer(params, cfg, accelerator.device)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    dist.prepare_sharding(accelerator, model)
    wrapped, optimizer = accelerator.prepare(dist.StudentLoss(model, full_logits=head_check.full_logits), optimizer)
    from distill.cache.reader import collate

    null_batch = collate([truncate_sample(data.dataset[data.train_idx[0]], 2)], data.pad_id)
    null_batch["targets"].fill_(-100)
    run = Run(cfg=cfg, out=out, accelerator=accelerator, model=wrapped, student=model, tokenizer=tokenizer,
              optimizer=optimizer, scheduler=scheduler, opt_kind=opt_kind, data=data, plan=plan, loss_cfg=loss_cfg,
              eval_cfg=eval_cfg, head_check=head_check, null_batch=null_batch, total_steps=total_steps,
              log=MetricsLog(out / METRICS_FILE), batch_plan=batch_plan)
    if resuming:
        _resume(run)
    return run


def train_loop(run: Run, *, on_step_end: Callable[[int], None] | None = None) -> Progress:
    """The optimizer steps, from the run's position to the last one.

    Each step: take the step's global micro-batches, forward/backward this process's share of them,
    step the optimizer, log the figures of the whole step (all processes), evaluate, checkpoint.
    """
    from tqdm.auto import tqdm

    cfg, accelerator, pos = run.cfg, run.accelerator, run.position
    progress = Progress()
    stream = run.plan.stream(pos.epoch, pos.batch_index)
    bar = tqdm(total=run.total_steps, initial=pos.step, desc="train", dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_main_process))
    if pos.step == 0 and cfg.eval_every:
        evaluate(run, 0)  # the untrained student's held-out KL: the baseline the final figure is read against
    t_start = time.perf_counter()
    run.model.train()
    while pos.step < run.total_steps:
        t0, c0 = time.perf_counter(), time.process_time()
        micro = []
        for _ in range(cfg.grad_accum):
            pos.epoch, index, batch_ids = next(stream)
            micro.append(batch_ids)
        pos.batch_index = index + 1
        batches = _my_batches(run, micro)
        sums, n_valid = _forward_backward(run, batches)
        grad_norm = _optimizer_step(run)
        pos.step += 1
        rec = _train_record(run, sums, n_valid, batches, grad_norm, t0, c0)
        progress.tokens += rec["tokens"]
        if accelerator.is_main_process and cfg.log_every and (pos.step % cfg.log_every == 0 or pos.step == run.total_steps):
            run.log.write(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", kl=f"{rec['kl']:.4f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}")
        if cfg.eval_every and pos.step % cfg.eval_every == 0 and pos.step < run.total_steps:
            progress.last_eval = evaluate(run, pos.step)
        if cfg.save_every and pos.step % cfg.save_every == 0 and pos.step < run.total_steps:
            _save_checkpoint(run)
        if on_step_end is not None:
            on_step_end(pos.step)
    bar.close()
    progress.seconds = time.perf_counter() - t_start
    return progress


def finish(run: Run, progress: Progress) -> dict:
    """The final held-out evaluation, the summary, and the adapters in final/ (written once)."""
    from students import distributed as dist
    from students.model import count_parameters

    accelerator, pos = run.accelerator, run.position
    last_eval = evaluate(run, pos.step) or progress.last_eval
    summary = {
        "steps": pos.step, "total_steps": run.total_steps, "epoch": pos.epoch, "optimizer": run.opt_kind,
        "head_path": run.head_check.path, "processes": accelerator.num_processes, "engine": dist.engine_name(accelerator),
        "initial_eval_kl": next((r["eval_kl"] for r in read_metrics(run.out) if r.get("kind") == "eval" and r["step"] == 0), None),
        "final_eval_kl": last_eval["eval_kl"] if last_eval else None,
        "final_top1_agreement": last_eval["eval_top1_agreement"] if last_eval else None,
        "eval_tokens": last_eval["eval_tokens"] if last_eval else 0,
        "train_seconds_this_session": progress.seconds, "tokens_this_session": progress.tokens,
        "parameters": count_parameters(run.student), "run_dir": str(run.out), "final_dir": str(run.out / "final"),
        "peak_gpu_memory_gib": _peak_gpu_memory_gib(accelerator.device),
    }
    if run.batch_plan is not None:
        summary["batch_plan"] = run.batch_plan
    state_dict = dist.full_state_dict(accelerator, run.model)  # gathered from the shards under FSDP/DeepSpeed
    if accelerator.is_main_process:
        _save_final(run.out, run.student, run.tokenizer, summary, state_dict=state_dict)
    accelerator.wait_for_everyone()
    return summary


# ---- the pieces of a run ------------------------------------------------------------------------------

def _open_data(cfg: TrainConfig, tokenizer, dataset, *, verify: bool = True) -> Data:
    """The cache (checked against the student's tokenizer) or the given samples, cut and split."""
    from distill.cache.reader import split_indices

    manifest = None
    if dataset is None:
        reader, manifest = open_cache(cfg.cache, tokenizer, verify=verify)
        from distill.cache.reader import CacheDataset

        dataset = CacheDataset(reader)
        pad_id = int(manifest.pad_id)
    else:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cfg.max_length is not None:
        dataset = TruncatedDataset(dataset, cfg.max_length)
    n = len(dataset)
    if n == 0:
        raise DistillError(f"cache {cfg.cache} holds no samples")
    train_idx, eval_idx = split_indices(n, cfg.eval_fraction, seed=cfg.seed)
    if cfg.eval_samples is not None:
        eval_idx = eval_idx[: cfg.eval_samples]
    if not train_idx:
        raise DistillError(f"no training samples left after holding out {len(eval_idx)} of {n}; lower --eval-fraction")
    return Data(dataset=dataset, train_idx=train_idx, eval_idx=eval_idx, pad_id=pad_id, manifest=manifest,
                cache_temperature=float(manifest.temperature) if manifest else 1.0, vocab_size=len(tokenizer))


def _run_record(cfg: TrainConfig, spec, data: Data, loss_cfg, schedule: dict) -> dict:
    """run.json: what the run is (a --resume must match it) and how it was set up."""
    m = data.manifest
    return {
        "config": cfg.to_dict(),
        "student": spec.to_dict(),
        "cache": {"path": str(Path(cfg.cache).resolve()) if cfg.cache else None,
                  "tokenizer_fingerprint": m.tokenizer_fingerprint if m else None,
                  "teacher": m.teacher if m else None,
                  "k": m.k if m else None,
                  "codec": m.codec if m else None,
                  "codec_params": m.codec_params if m else None,
                  "temperature": m.temperature if m else None,
                  "num_samples": len(data.dataset),
                  "manifest_sha256": _manifest_hash(cfg.cache) if m else None},
        "loss": {"name": cfg.loss, "temperature": loss_cfg.temperature, "cache_temperature": data.cache_temperature,
                 "tail_rule": cfg.retemper_tail, "kd_weight": cfg.kd_weight,
                 "ce_weight": cfg.ce_weight, "jsd_beta": cfg.jsd_beta, "chunk_size": cfg.loss_chunk_size,
                 "vocab_size": data.vocab_size},
        "schedule": schedule,
    }


def _resume(run: Run) -> None:
    """Continue from the newest complete checkpoint (every process loads it), or find the run finished."""
    from students import checkpoint as ckpt_mod
    from students import distributed as dist

    accelerator, out = run.accelerator, run.out
    dist.on_main(accelerator, lambda: ckpt_mod.clean_partial(out))
    ckpts = ckpt_mod.list_checkpoints(out)
    if ckpts:
        state = ckpt_mod.load_checkpoint(ckpts[-1], model=run.student, optimizer=run.optimizer, scheduler=run.scheduler,
                                         rank=accelerator.process_index)
        run.position = Position(step=int(state["step"]), epoch=int(state["epoch"]), batch_index=int(state["batch_index"]))
    if (out / "final" / "summary.json").is_file() and run.position.step >= run.total_steps:
        run.finished = json.loads((out / "final" / "summary.json").read_text())
        return
    dist.on_main(accelerator, lambda: _truncate_metrics(out / METRICS_FILE, run.position.step))


def _my_batches(run: Run, micro: list[list[int]]) -> list[dict]:
    """This process's micro-batches of the step, collated (students.distributed.step_share)."""
    from distill.cache.reader import collate
    from students.distributed import step_share

    share = step_share(micro, run.accelerator.process_index, run.accelerator.num_processes)
    return [collate([run.data.dataset[j] for j in ids], run.data.pad_id) if ids else run.null_batch for ids in share]


def _forward_backward(run: Run, batches: list[dict]):
    """Forward and backward of this process's micro-batches; returns (their LossSums, the step's valid tokens).

    The normaliser is the number of valid tokens over ALL micro-batches of the step, in all processes,
    counted before the first backward. Gradients are reduced over processes in the last backward only.
    """
    from distill.losses import combine_loss
    from students.distributed import reduce_sum

    accelerator = run.accelerator
    n_local = sum(int((b["targets"] != -100).sum()) for b in batches)
    n_valid = int(reduce_sum(accelerator, [n_local])[0])
    total = None
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        accelerator.sync_gradients = last  # DeepSpeed steps its engine in the synchronising backward
        with (_nullcontext() if last else accelerator.no_sync(run.model)):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                sums = run.model(batch, run.loss_cfg)
            # DDP / FSDP average gradients over processes; the normaliser already counts them all.
            loss = combine_loss(sums, n_valid, run.loss_cfg) * accelerator.num_processes
            accelerator.backward(loss)
        total = sums.detached() if total is None else total + sums.detached()
    return total, n_valid


def _optimizer_step(run: Run):
    """Clip (the norm over all processes' reduced gradients), step optimizer and schedule; the norm or None."""
    cfg = run.cfg
    grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _train_record(run: Run, sums, n_valid: int, batches: list[dict], grad_norm, t0: float, c0: float) -> dict:
    """The step's metrics line: losses and statistics of the whole step, summed over all processes.
    `cpu_s`: this process's CPU seconds for the step (all its threads): on a shared machine the wall
    clock mostly measures the other tenants, the CPU time what the step cost."""
    from students.distributed import reduce_sum

    cfg, pos = run.cfg, run.position
    local_tokens = sum(int(b["attention_mask"].sum()) for b in batches if b is not run.null_batch)
    kd, ce, kl, top1, tokens = reduce_sum(run.accelerator, [sums.kd, sums.ce, sums.kl_sum, sums.top1_agree, local_tokens])
    denom = max(n_valid, 1)
    dt = time.perf_counter() - t0
    rec = {"kind": "train", "step": pos.step, "epoch": pos.epoch, "lr": run.scheduler.get_last_lr()[0],
           "valid_tokens": n_valid, "tokens": int(tokens), "tokens_per_s": tokens / dt if dt > 0 else None,
           "cpu_s": round(time.process_time() - c0, 4)}
    kd, ce = kd / denom, ce / denom
    rec.update(kd=kd, ce=ce, loss=cfg.kd_weight * kd + cfg.ce_weight * ce, kl=kl / denom, top1_agreement=top1 / denom)
    if grad_norm is not None:
        rec["grad_norm"] = float(grad_norm)
    return rec


def evaluate(run: Run, at_step: int) -> dict | None:
    """Held-out KL and top-1 agreement at the cache temperature (as `distill.evaluate.evaluate_on_cache`);
    the held-out batches are divided among the processes and their sums added. Logged once."""
    import torch

    from distill.cache.reader import collate
    from students.distributed import batch_share, reduce_sum

    if not run.data.eval_idx:
        return None
    accelerator, idx, size = run.accelerator, run.data.eval_idx, run.cfg.eval_batch_size
    batches = [idx[i:i + size] for i in range(0, len(idx), size)]
    kl_sum = torch.zeros((), dtype=torch.float64)
    agree_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    was_training = run.model.training
    run.model.eval()
    try:
        with torch.no_grad():
            for ids in batch_share(batches, accelerator.process_index, accelerator.num_processes):
                batch = collate([run.data.dataset[j] for j in ids], run.data.pad_id) if ids else run.null_batch
                sums = run.model({k: v.to(accelerator.device) for k, v in batch.items()}, run.eval_cfg)
                kl_sum += sums.kl_sum.double().cpu()
                agree_sum += sums.top1_agree.double().cpu()
                tokens += sums.n_tokens
    finally:
        run.model.train(was_training)
    kl_sum, agree_sum, tokens = reduce_sum(accelerator, [kl_sum, agree_sum, tokens])
    tokens = int(tokens)
    rec = {"kind": "eval", "step": at_step, "eval_kl": kl_sum / tokens if tokens else math.nan,
           "eval_top1_agreement": agree_sum / tokens if tokens else math.nan, "eval_tokens": tokens}
    if accelerator.is_main_process:
        run.log.write(rec)
    return rec


def _save_checkpoint(run: Run) -> None:
    """checkpoints/step-XXXXXX, written by the main process with every process's RNG state."""
    from students import checkpoint as ckpt_mod
    from students.distributed import gather_rng_states

    accelerator, pos = run.accelerator, run.position
    rng_states = gather_rng_states(accelerator)
    if accelerator.is_main_process:
        ckpt_mod.save_checkpoint(run.out, pos.step, model=run.student, optimizer=run.optimizer, scheduler=run.scheduler,
                                 trainer_state={"epoch": pos.epoch, "batch_index": pos.batch_index, "seed": run.cfg.seed,
                                                "total_steps": run.total_steps},
                                 keep=run.cfg.keep_checkpoints, rng_states=rng_states)
    accelerator.wait_for_everyone()


class _Subset:
    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _peak_gpu_memory_gib(device) -> float | None:
    """Peak memory torch allocated on this process's GPU (None on the CPU): what training needed."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _manifest_hash(cache: str | Path) -> str:
    import hashlib

    from distill.cache.format import MANIFEST_NAME

    return "sha256:" + hashlib.sha256((Path(cache) / MANIFEST_NAME).read_bytes()).hexdigest()


def _save_final(out: Path, model, tokenizer, summary: dict, *, state_dict: dict | None = None) -> None:
    import shutil

    final = out / "final"
    tmp = out / f".tmp-final-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(str(tmp))
    atomic_write_json(tmp / "summary.json", summary, indent=1, sort_keys=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
