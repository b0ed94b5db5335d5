"""What the trainer needs to run as N processes (`accelerate launch`): who trains on which rows, the
student and its loss as one module for the engine to wrap, and global figures from per-process ones.

The engine is accelerate (torch.distributed under it: DDP, FSDP, DeepSpeed); nothing here launches a
process or implements a collective of its own.

One config trains the same model under any number of processes: `--batch-size`/`--batch-tokens` and
`--grad-accum` keep describing the GLOBAL batch of one optimizer step, and `step_share` divides that
batch among the processes. The loss of a step is a sum over its valid tokens divided by the valid
tokens of the whole step (all processes), and padding changes no token's value, so N processes
compute the same gradient as one (up to float rounding).

torch is imported at the top: import this module inside functions (the CLI stays fast).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Sequence

import torch

from distill.errors import DistillError


# ---- who trains on which rows -------------------------------------------------------------------

def row_share(n: int, rank: int, world: int) -> slice:
    """Process `rank`'s contiguous share of n rows (the first n % world processes get one more)."""
    base, extra = divmod(int(n), int(world))
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def step_share(micro: Sequence[Sequence[int]], rank: int, world: int) -> list[list[int]]:
    """Process `rank`'s micro-batches of one optimizer step, from the step's global micro-batches.

    Together the processes hold every row of the step once:
    * at least as many micro-batches as processes: micro-batch i goes to process i % world;
    * fewer (e.g. --grad-accum 1 on 2 GPUs): every micro-batch's rows are split into `world`
      contiguous shares, one per process.
    Every process gets the same NUMBER of micro-batches, topped up with empty ones ([]) that the loop
    runs as a forward/backward with no trained token: DDP and FSDP need every process to take part
    in every forward and backward of a step, or they hang.
    """
    micro = [list(m) for m in micro]
    if world == 1:
        return micro
    if len(micro) >= world:
        mine = micro[rank::world]
        return mine + [[] for _ in range(math.ceil(len(micro) / world) - len(mine))]
    return [m[row_share(len(m), rank, world)] for m in micro]


def batch_share(batches: Sequence[Sequence[int]], rank: int, world: int) -> list[list[int]]:
    """Process `rank`'s share of whole batches (held-out evaluation): batch i to process i % world,
    topped up with empty ones so that every process runs as many forwards (FSDP gathers weights in
    each forward, DDP broadcasts buffers: both are collective)."""
    batches = [list(b) for b in batches]
    mine = batches[rank::world]
    return mine + [[] for _ in range(math.ceil(len(batches) / world) - len(mine))]


# ---- the student and its loss as one module -------------------------------------------------------

# Attributes accelerate reads from the model it prepares: a quantized model must not be moved with
# .to(), FSDP's transformer wrap policy reads the decoder layer classes from _no_split_modules,
# DeepSpeed sizes its buckets from config.hidden_size.
_PASSED_THROUGH = ("is_loaded_in_4bit", "is_loaded_in_8bit", "hf_device_map", "_no_split_modules", "config")


class StudentLoss(torch.nn.Module):
    """The student and its chunked KD loss as one module: forward(batch, loss_cfg) -> LossSums.

    Why a module: DDP prepares its gradient reduction, and FSDP gathers sharded weights, in the forward
    of the module they wrap. The loss calls the decoder body and the output head directly (the
    [B, T, V] logits are never built), which would bypass a wrapper around the bare model; wrapping
    this module instead puts the whole computation, body and head, inside the engine's forward.
    """

    def __init__(self, student, *, full_logits: bool = False):
        super().__init__()
        self.student = student
        self.full_logits = bool(full_logits)
        for name in _PASSED_THROUGH:
            value = getattr(student, name, None)
            if value is not None:
                setattr(self, name, value)

    def forward(self, batch: dict, loss_cfg):
        from distill.cache.target import SparseTarget
        from distill.losses import target_loss_sums
        from distill.models.head import rows_and_head

        rows, head = rows_and_head(self.student, batch, full_logits=self.full_logits)
        sums = target_loss_sums(rows, head, batch["targets"], SparseTarget.from_dict(batch), loss_cfg)
        if sums.n_tokens == 0 and not self.full_logits and torch.is_grad_enabled():
            # No trained token: the loss is hidden[:0].sum(), which reaches every weight but the head's.
            # Put the head in the graph too (zero), so that DDP sees a gradient for a LoRA adapter on it.
            zero = head(rows.reshape(-1, rows.shape[-1])[:0]).sum().float()
            sums.kd = sums.kd + zero
        return sums


# ---- global figures -------------------------------------------------------------------------------

def reduce_sum(accelerator, values: Sequence[float | torch.Tensor]) -> list[float]:
    """Sum `values` over all processes (float64); one process: the values as they are."""
    vec = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().reshape(()).cpu() for v in values])
    if accelerator.num_processes > 1:
        vec = accelerator.reduce(vec.to(accelerator.device), reduction="sum").cpu()
    return [float(v) for v in vec]


def on_main(accelerator, fn):
    """Run `fn` on the main process only; every process returns its result or raises its DistillError.

    For what must happen once (create or check the run directory) but whose outcome every process
    needs: without the broadcast the others would go on, or wait forever, when the main one refuses.
    """
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except DistillError as err:
            error = str(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [result, error]
        broadcast_object_list(box, from_process=0)
        result, error = box
    if error is not None:
        raise DistillError(error)
    return result


def gather_rng_states(accelerator) -> list[dict]:
    """The RNG state of every process, rank order (each draws its own dropout masks)."""
    from students.checkpoint import rng_state

    state = rng_state()
    if accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    return list(gather_object([state]))


# ---- engines that shard the student ------------------------------------------------------------------

def engine_name(accelerator) -> str:
    """"single", "ddp", "fsdp" or "deepspeed": how the student is wrapped."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def shards_weights(accelerator) -> bool:
    """True under FSDP or DeepSpeed: each process holds a shard of the weights and optimizer state."""
    return engine_name(accelerator) in ("fsdp", "deepspeed")


def quant_storage_for(accelerator, quant: str):
    """The dtype NF4 weights are stored in: the compute dtype when FSDP/DeepSpeed shards them (they
    shard only float tensors of one dtype per unit), else None (bitsandbytes' uint8)."""
    if quant != "nf4" or not shards_weights(accelerator):
        return None
    from distill.models.devices import compute_dtype

    return compute_dtype(accelerator.device)


def prepare_sharding(accelerator, student) -> None:
    """FSDP wraps each LoRA layer in its own unit (trainable and frozen weights cannot share a flat
    parameter), and each decoder layer in one: peft's policy, as the Hugging Face Trainer sets it."""
    if engine_name(accelerator) != "fsdp":
        return
    from peft.utils.other import fsdp_auto_wrap_policy

    accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(student)


def full_state_dict(accelerator, model) -> dict | None:
    """The student's full state dict under FSDP/DeepSpeed (a collective: every process calls it; the main
    one gets the dict, with StudentLoss's "student." prefix removed), None otherwise."""
    if not shards_weights(accelerator):
        return None
    state = accelerator.get_state_dict(model)
    if state is None:
        return None
    return {(k[len("student."):] if k.startswith("student.") else k): v for k, v in state.items()}


# ---- the launcher -----------------------------------------------------------------------------------

def die_with_launcher() -> None:
    """Under torchrun / `accelerate launch`, make this worker die when its launcher dies.

    torchrun starts every worker in a session of its own, so when the launcher is SIGKILLed (kill -9
    of its process group, a job scheduler, the OOM killer) the workers go on training as orphans and
    keep writing the run directory that a `--resume` then reads (seen: dozens of steps logged after
    the kill). Linux's parent-death signal ends them with it. Elsewhere, nothing changes.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() == 1:  # the launcher was gone before we asked
        os.kill(os.getpid(), signal.SIGKILL)
