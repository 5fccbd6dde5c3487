"""One grid cell over several processes: torchrun starts them, ablate trains with DDP.

    torchrun --nproc_per_node 4 -m ablate run GRID

Every rank runs ``ablate run``. Rank 0, the leader, runs the grid as one process would (it
alone reads and writes the results folder, claims measurements and prints); the others,
the followers, wait for it. When the leader comes to a measurement registered with
``distributed=True`` (``train``, ``fid``) it sends the cell to the followers, every rank
runs the measurement on its share, and the leader stores the result. The other
measurements (``flops``, ``timing``) run on the leader alone.

How the work is shared, so that N ranks compute what one process would:

- training: each rank takes an equal slice of the same global batch (``train.batch_size``,
  which must divide by the number of ranks); every rank draws the whole batch's timesteps,
  noise and dropped labels from the same seeded generator and keeps its slice, so the data
  order and the noise are those of one process, and DistributedDataParallel averages the
  gradients into the global batch's. Checkpoints hold no rank state: one written by N ranks
  resumes on M (tested: 2 ranks, then 1, give one process's weights).
- sampling (evaluation, FID): sample batch i uses noise seeded by (seed, i) and is drawn by
  rank i mod N, then gathered: the images are the same for any N.

gloo runs on CPUs (the tests use two CPU processes), nccl on GPUs (rank r uses GPU
LOCAL_RANK). The followers take their orders over a second, gloo group whose timeout is
long: a leader busy with a long non-distributed measurement does not time them out.

A failure inside a distributed measurement stops the run after the leader has recorded
it: another rank may be stuck in a collective, so going on to the next cell is not safe.
Run again: what is done is kept, and training resumes from its checkpoint.
"""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# The training group's collective timeout: a rank that waits longer than this for the others
# (one crashed, or is stuck) raises instead of hanging forever.
TIMEOUT_ENV = "ABLATE_DDP_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 30.0
# Followers wait this long for the leader's next order (a timing grid on the leader can be long).
ORDERS_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, n: int, what: str = "train.batch_size") -> slice:
        """This rank's slice of a global batch of ``n``: equal shares, in rank order."""
        if n % self.size:
            raise ValueError(f"{what}={n} does not divide over {self.size} ranks; make it a multiple of {self.size}")
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)


_WORLD = World()
_ORDERS = None  # the gloo group the leader's orders and the statuses go through


def world() -> World:
    return _WORLD


def from_env() -> World:
    """The World torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK (none: one process)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"WORLD_SIZE, RANK, LOCAL_RANK must be integers ({e})") from None
    return World(rank, size, local)


def init(device_setting: str = "auto") -> World:
    """Join the process group torchrun describes (once); returns this process's World.

    ``device_setting`` is the grid's ``device``: a CPU grid uses gloo even on a GPU node."""
    global _WORLD, _ORDERS
    w = from_env()
    if not w.distributed or dist.is_initialized():
        _WORLD = w
        return w
    cuda = torch.cuda.is_available() and device_setting != "cpu"
    if cuda:
        if w.local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {w.rank}: LOCAL_RANK {w.local_rank} but this node has "
                             f"{torch.cuda.device_count()} GPUs; one rank per GPU (--nproc_per_node)")
        torch.cuda.set_device(w.local_rank)
    minutes = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=minutes))
    _ORDERS = dist.new_group(backend="gloo", timeout=ORDERS_TIMEOUT)
    _WORLD = w
    return w


def close() -> None:
    global _WORLD, _ORDERS
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD, _ORDERS = World(), None


def all_gather(obj):
    """Every rank's ``obj`` (picklable, on the CPU), in rank order, on every rank."""
    if not _WORLD.distributed:
        return [obj]
    out = [None] * _WORLD.size
    dist.all_gather_object(out, obj, group=_ORDERS)
    return out


def mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (the training group)."""
    if not _WORLD.distributed:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / _WORLD.size


def barrier() -> None:
    if _WORLD.distributed:
        dist.barrier(group=_ORDERS)


# ---------------------------------------------------------------------------------
# The leader's orders
# ---------------------------------------------------------------------------------
class DistributedFailure(RuntimeError):
    """A distributed measurement failed on some rank; the run must stop (see the module)."""


def _send(order) -> None:
    dist.broadcast_object_list([order], src=0, group=_ORDERS)


def run_everywhere(name: str, fn, cell, progress: bool):
    """Leader: run measurement ``fn`` on ``cell`` on every rank; returns the leader's result.
    Raises the first rank's error (with its rank) if any rank failed, as DistributedFailure
    (the caller records it, then stops the run)."""
    _send(("measure", name, cell.config, str(cell._workdir), cell.needed))
    result, error = None, None
    try:
        result = fn(cell, progress=progress)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001  -- reported to and by every rank alike
        error = e
    statuses = all_gather(None if error is None else _describe(error))
    bad = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if bad:
        rank, msg = bad[0]
        raise DistributedFailure(f"rank {rank} of {_WORLD.size}: {msg}") from error
    return result


def stop_followers() -> None:
    if _WORLD.distributed and _WORLD.leader:
        _send(None)


def follow() -> int:
    """Follower: run the leader's orders until it says stop; returns the exit code."""
    from .cell import Cell
    from .measure import MEASURES

    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=_ORDERS)
        if box[0] is None:
            return 0
        _, name, config, workdir, needed = box[0]
        error = None
        try:
            if config.get("threads"):
                torch.set_num_threads(config["threads"])
            MEASURES.get(name).fn(Cell(config, Path(workdir), needed), progress=False)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            error = _describe(e)
        all_gather(error)


def _describe(err: BaseException) -> str:
    from .settings import one_line

    return one_line(err, with_type=True)
