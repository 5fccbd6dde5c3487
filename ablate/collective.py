"""Collectives over the ranks of one torchrun launch: which rank this process is, the
process groups, gathering objects, the mean of a tensor and work rank 0 does alone.

This module imports torch and the standard library only: training, sampling and the
measurements use it, and ``ablate.torchrun`` (the leader's orders to the other ranks,
above the runner) builds on it. How the work is shared over the ranks is said there.

gloo runs on CPUs (the tests use two CPU processes), nccl on GPUs (rank r uses GPU
LOCAL_RANK). Collectives of the work (DDP, gathering samples) time out after
``ABLATE_DDP_TIMEOUT_MIN`` minutes: a rank that failed alone leaves the others waiting
that long at most. The leader's orders, its outcomes and the ranks' statuses go over a
second gloo group (``orders_group``) whose timeout is long: a leader busy with a long
non-distributed measurement (a timing), or scoring FID alone, does not time the others out.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

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

    def share(self, n: int) -> slice:
        """This rank's slice of a global batch of ``n``: equal shares, in rank order."""
        if n % self.size:
            raise ValueError(f"a batch of {n} does not divide over {self.size} ranks")
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)


_WORLD = World()
_ORDERS = None  # the gloo group of the leader's orders and the statuses (long timeout)
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


def init(device: torch.device | str = "cpu") -> World:
    """Join the process group torchrun describes (once); returns this process's World.

    ``device``: what the ranks compute on; a CUDA device means nccl (rank r on GPU
    LOCAL_RANK), anything else gloo, so a CPU grid uses gloo even on a GPU node."""
    global _WORLD, _ORDERS, _OBJECTS
    w = from_env()
    if not w.distributed or dist.is_initialized():
        _WORLD = w
        return w
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
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


def close() -> None:
    global _WORLD, _ORDERS, _OBJECTS
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD, _ORDERS, _OBJECTS = World(), None, None


def orders_group():
    """The group of the leader's orders and the ranks' outcomes (gloo, a long timeout)."""
    return _ORDERS


def all_gather(obj):
    """Every rank's ``obj`` (picklable, on the CPU), in rank order, on every rank; a
    collective of the work (its timeout), on the CPU even where the ranks train over nccl."""
    return gather(obj, _OBJECTS)


def gather_to_leader(obj) -> list | None:
    """Every rank's ``obj`` (picklable, on the CPU), in rank order, on rank 0; None on the
    others (what only rank 0 uses, samples it scores, is not copied to every rank); a
    collective of the work, on the CPU even where the ranks train over nccl."""
    if not _WORLD.distributed:
        return [obj]
    out = [None] * _WORLD.size if _WORLD.leader else None
    dist.gather_object(obj, out, dst=0, group=_OBJECTS)
    return out


def gather(obj, group=None) -> list:
    """Every rank's ``obj`` in rank order, over ``group`` (default: the default group)."""
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
