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
- sampling (evaluation, FID): rank r computes sample batches r, r + N, ... and replays the
  random draws of the others, then rank 0 gathers the batches: its images are exactly one
  process's, for any N (the other ranks keep none: rank 0 alone writes and scores them).
- what rank 0 does alone (writing checkpoints and samples, scoring FID) is a
  ``leader_only()`` section: the others wait for its outcome, so a failure there (a full
  disk) ends every rank's share at once instead of leaving them in a collective.

gloo runs on CPUs (the tests use two CPU processes), nccl on GPUs (rank r uses GPU
LOCAL_RANK). Collectives of the work (DDP, gathering samples) time out after
``ABLATE_DDP_TIMEOUT_MIN`` minutes: a rank that failed alone leaves the others waiting
that long at most. The leader's orders, its outcomes and the ranks' statuses go over a
second gloo group whose timeout is long: a leader busy with a long non-distributed
measurement (a timing), or scoring FID alone, does not time the others out.

A failure inside a distributed measurement stops the run after the leader has recorded
it: another rank may be stuck in a collective, so going on to the next cell is not safe.
Run again: what is done is kept, and training resumes from its checkpoint.
"""
from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# The work collectives' timeout (DDP, gathering samples): a rank that waits longer than this
# for the others (one failed alone, or is stuck) raises instead of hanging. Ranks do equal
# shares and rank 0's long solo work waits on the orders group, so the ranks of a healthy run
# are never minutes apart (a compile, at most).
TIMEOUT_ENV = "ABLATE_DDP_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 10.0
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
_OBJECTS = None  # the gloo group of the work's objects where the default group is nccl (else the default)


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
    global _WORLD, _ORDERS, _OBJECTS
    w = from_env()
    if not w.distributed or dist.is_initialized():
        _WORLD = w
        return w
    from .cell import resolve_device

    cuda = torch.cuda.is_available() and resolve_device(device_setting).type == "cuda"  # cpu, cpu:0: gloo
    if cuda:
        if w.local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {w.rank}: LOCAL_RANK {w.local_rank} but this node has "
                             f"{torch.cuda.device_count()} GPUs; one rank per GPU (--nproc_per_node)")
        torch.cuda.set_device(w.local_rank)
    minutes = timeout_min()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=minutes))
    _ORDERS = dist.new_group(backend="gloo", timeout=ORDERS_TIMEOUT)
    # Objects of the work (gathered samples, the checkpoint step) on the CPU, with the work's
    # timeout: through nccl they would be copied to the GPUs, rank 0's holding every rank's.
    _OBJECTS = dist.new_group(backend="gloo", timeout=timedelta(minutes=minutes)) if cuda else None
    _WORLD = w
    return w


def timeout_min() -> float:
    """$ABLATE_DDP_TIMEOUT_MIN, checked (a ValueError in one line)."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MIN))
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0 or minutes == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a number of minutes > 0")
    return minutes


def rank_problems(cells: list[dict], ranks: int, trained=lambda config: False) -> str | None:
    """Why ``cells`` cannot train over ``ranks`` processes (a global batch that does not divide),
    or None; checked before anything runs, so that a launch does not fail cell by cell.
    ``trained(config)``: whether the cell's training is done already (sampling for FID over
    any number of ranks needs no division), so its batch is not checked."""
    from .cell import label
    from .measure import MEASURES

    if ranks <= 1:
        return None
    for config in cells:
        if "train" not in config["measure"] or trained(config):
            continue
        batch = MEASURES.get("train").settings(**config.get("train") or {}).batch_size
        if batch % ranks:
            return (f"train.batch_size: {batch} does not divide over {ranks} ranks (each trains an equal share "
                    f"of the global batch; {label(config)} is still to train); use a multiple of {ranks}")
    return None


def close() -> None:
    global _WORLD, _ORDERS, _OBJECTS
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD, _ORDERS, _OBJECTS = World(), None, None


def all_gather(obj):
    """Every rank's ``obj`` (picklable, on the CPU), in rank order, on every rank; a
    collective of the work (its timeout), on the CPU even where the ranks train over nccl."""
    return _gather(obj, _OBJECTS)


def gather_to_leader(obj) -> list | None:
    """Every rank's ``obj`` (picklable, on the CPU), in rank order, on rank 0; None on the
    others (what only rank 0 uses, samples it scores, is not copied to every rank); a
    collective of the work, on the CPU even where the ranks train over nccl."""
    if not _WORLD.distributed:
        return [obj]
    out = [None] * _WORLD.size if _WORLD.leader else None
    dist.gather_object(obj, out, dst=0, group=_OBJECTS)
    return out


def _gather(obj, group=None) -> list:
    if not _WORLD.distributed:
        return [obj]
    out = [None] * _WORLD.size
    dist.all_gather_object(out, obj, group=group)
    return out


class LeaderFailed(RuntimeError):
    """Raised on the other ranks when rank 0 failed in a ``leader_only`` section."""


@contextmanager
def leader_only():
    """``with leader_only() as lead: if lead: ...``: work rank 0 does alone (writing files,
    scoring), which the other ranks skip and wait for. Every rank learns rank 0's outcome
    on leaving: if it failed, the others raise LeaderFailed (and rank 0 its own error), so
    every rank leaves the measurement together instead of waiting in a collective."""
    if not _WORLD.distributed:
        yield True
        return
    box = [False]
    try:
        yield _WORLD.leader
        box = [True]
    finally:
        dist.broadcast_object_list(box, src=0, group=_ORDERS)
    if not box[0]:
        raise LeaderFailed("rank 0 failed (its error is the one recorded)")


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
    statuses = _statuses(_status(error))
    bad = [(secondary, r, text) for r, s in enumerate(statuses) if s is not None for secondary, text in [s]]
    if bad:
        _, rank, text = min(bad)  # the cause first: a rank's own error before another's timeout waiting for it
        raise DistributedFailure(f"rank {rank} of {_WORLD.size}: {text}") from error
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
            if not isinstance(e, LeaderFailed):
                traceback.print_exc(file=sys.stderr)
            error = e
        _statuses(_status(error))


def _statuses(status):
    """Every rank's outcome of a measurement, over the orders group (a rank that failed
    early waits here for the others however long their share takes)."""
    return _gather(status, _ORDERS)


def _status(err: BaseException | None) -> tuple[bool, str] | None:
    """A rank's outcome for the others: None (done), or (secondary, its error in one line);
    secondary: it failed because another rank did (rank 0 failed alone, or a collective
    timed out or lost its peer waiting for a rank that had failed)."""
    if err is None:
        return None
    from .settings import one_line

    text = one_line(err, with_type=True)
    secondary = isinstance(err, (LeaderFailed, dist.DistError)) or any(
        s in text for s in ("Timed out", "timed out", "Connection closed", "Connection reset"))
    return secondary, text
