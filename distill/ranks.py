"""Which process this is and how many there are, for commands that split their work across processes.

`distill cache build`, `distill teacher generate`, `distill bench` and `distill run` run as one process
by default. Started N times by `accelerate launch --multi_gpu --num_processes N` (torchrun under it, or MPI), each
process learns its rank here and takes its share of the work: item i of a list of work units goes to
rank i % N (`Ranks.take`). Nothing here is a launcher or a collective of our own: the process group is
accelerate's `PartialState` (torch.distributed under it: NCCL between GPUs, gloo on CPUs), and the
object collectives are accelerate's.

A plain run (no launcher in the environment) never initialises torch.distributed: `current_ranks()`
is then one process and every collective is a no-op, so single-process behaviour is unchanged.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from distill.errors import DistillError

T = TypeVar("T")

# Environment variables through which launchers announce the number of processes (torchrun / accelerate,
# then the MPI flavours accelerate also understands).
_WORLD_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# A process that waits for the others (e.g. for the main process to run a single-process stage of a
# pipeline) must not time out: the launcher already stops every process when one of them dies.
_GROUP_TIMEOUT_HOURS = 48


def launched_world_size() -> int:
    """The number of processes a launcher started (1 without a launcher)."""
    for name in _WORLD_ENV:
        value = os.environ.get(name)
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                continue
    return 1


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one command; `Ranks()` is a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def take(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`: items rank, rank + N, rank + 2N, ... (balanced, deterministic)."""
        return list(items[self.rank::self.world])

    def barrier(self) -> None:
        """Wait until every process got here."""
        if self.distributed:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def gather(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
        if not self.distributed:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj`, on every rank."""
        if not self.distributed:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj if self.is_main else None])[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the main process only and return its result on every rank.

        A DistillError raised on the main process is raised on every rank (same message), so that no
        process is left waiting for one that failed; other exceptions stop the others with a short
        pointer to the main process's traceback.
        """
        if not self.distributed:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except DistillError as err:
                outcome, error = ("user", str(err)), err
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the others are told
                outcome, error = ("crash", f"{type(err).__name__}: {err}"), err
        kind, value = self.broadcast(outcome)
        if error is not None:
            raise error
        if kind == "user":
            raise DistillError(value)
        if kind == "crash":
            raise DistillError(f"the main process failed ({value}); see its traceback")
        return value


def current_ranks(device: Any = None) -> Ranks:
    """This process's Ranks; initialises accelerate's process group when a launcher started several.

    `device` is the device the command will compute on: "cpu" (or no CUDA GPU at all) gives a gloo
    group, so `accelerate launch --multi_gpu --num_processes N` also works on a machine without GPUs.
    """
    if launched_world_size() <= 1:
        return Ranks()
    from datetime import timedelta

    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = (not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
           or str(device or "").startswith("cpu"))
    try:
        state = PartialState(cpu=cpu, timeout=timedelta(hours=_GROUP_TIMEOUT_HOURS))
    except (RuntimeError, ValueError) as err:
        raise DistillError(f"the processes started by the launcher cannot form a group: {err}") from None
    destroy_group_at_exit()
    return Ranks(rank=state.process_index, world=state.num_processes,
                 local_rank=state.local_process_index,
                 local_world=int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)))


_destroy_registered = False


def destroy_group_at_exit() -> None:
    """Destroy torch.distributed's process group when this process exits normally (registered once).

    A process that leaves with its gloo group alive can abort at interpreter shutdown ("terminate called
    without an active exception", SIGABRT): gloo's worker threads still hold work objects whose tensors
    are freed while Python is being torn down. Seen in CI on a 2-process pipeline whose stages were all
    skipped, where the processes exit right after their last broadcast. Destroying the group
    while the interpreter is still whole avoids it. No barrier here: a process that exits on an error
    must not wait for peers that are inside another collective (the launcher stops them).
    """
    global _destroy_registered
    if not _destroy_registered:
        _destroy_registered = True
        atexit.register(_destroy_group)


def _destroy_group() -> None:
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def gpus_for_local_rank(local_rank: int, local_world: int, num_gpus: int) -> list[int]:
    """The GPUs a process may spread a model over when `local_world` processes share a machine.

    Each gets a contiguous, equal block (8 GPUs, 2 processes: 0-3 and 4-7), so that `--device-map auto`
    under `accelerate launch` never puts two processes' weights on one GPU. Leftover GPUs stay unused.
    """
    if local_world <= 1:
        return list(range(num_gpus))
    if num_gpus < local_world:
        raise DistillError(
            f"--device-map auto with {local_world} processes on this machine needs at least {local_world} GPUs "
            f"(it has {num_gpus}); start fewer processes per machine"
        )
    per = num_gpus // local_world
    return list(range(local_rank * per, (local_rank + 1) * per))
