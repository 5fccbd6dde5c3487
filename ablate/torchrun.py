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
  which must divide by the number of ranks: each measurement declares such a check as its
  ``rank_problem``, asked before anything runs); every rank draws the whole batch's timesteps,
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

The collectives themselves (process groups, timeouts, gathering) are ``ablate.collective``;
this module is the leader's side and the followers' loop, above the runner, which it
hands ``execute`` (``ablate.runner.run_grid``).

A failure inside a distributed measurement stops the run after the leader has recorded
it: another rank may be stuck in a collective, so going on to the next cell is not safe.
Run again: what is done is kept, and training resumes from its checkpoint.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from . import collective
from .cell import Cell, label
from .collective import LeaderFailed, close, from_env, timeout_min, world  # noqa: F401  (the CLI's)
from .device import resolve_device
from .measure import MEASURES, Measurement
from .runner import StopsRun, run_here
from .settings import one_line


def init(device_setting: str = "auto") -> collective.World:
    """Join the process group torchrun describes; ``device_setting`` is the grid's ``device``
    (it picks the backend: a CPU grid uses gloo even on a GPU node)."""
    return collective.init(resolve_device(device_setting))


def rank_problems(cells: list[dict], ranks: int,
                  done: Callable[[dict, str], bool] = lambda config, name: False) -> str | None:
    """Why ``cells`` cannot be measured over ``ranks`` processes, or None: each distributed
    measurement of a cell is asked (its ``rank_problem``, such as a global batch that does
    not divide); checked before anything runs, so that a launch does not fail cell by cell.
    ``done(config, name)``: whether the measurement is stored ok already (it runs no more)."""
    if ranks <= 1:
        return None
    for config in cells:
        for name in config["measure"]:
            m = MEASURES.get(name)
            if not m.distributed or m.rank_problem is None or done(config, name):
                continue
            settings = m.settings(**config.get(name) or {}) if m.settings else None
            problem = m.rank_problem(settings, ranks)
            if problem:
                return f"{name}.{problem} ({label(config)} is still to measure {name})"
    return None


class DistributedFailure(StopsRun):
    """A distributed measurement failed on some rank; the run must stop (see the module)."""


def execute(m: Measurement, cell: Cell, progress: bool) -> dict:
    """The runner's ``execute`` under torchrun: a distributed measurement on every rank (the
    leader's result is stored), any other on the leader alone."""
    if m.distributed and world().distributed:
        return run_everywhere(m.name, m.fn, cell, progress)
    return run_here(m, cell, progress)


def _send(order) -> None:
    dist.broadcast_object_list([order], src=0, group=collective.orders_group())


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
        raise DistributedFailure(f"rank {rank} of {world().size}: {text}") from error
    return result


def stop_followers() -> None:
    if world().distributed and world().leader:
        _send(None)


def follow() -> int:
    """Follower: run the leader's orders until it says stop; returns the exit code."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=collective.orders_group())
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
    return collective.gather(status, collective.orders_group())


def _status(err: BaseException | None) -> tuple[bool, str] | None:
    """A rank's outcome for the others: None (done), or (secondary, its error in one line);
    secondary: it failed because another rank did (rank 0 failed alone, or a collective
    timed out or lost its peer waiting for a rank that had failed)."""
    if err is None:
        return None
    text = one_line(err, with_type=True)
    secondary = isinstance(err, (LeaderFailed, dist.DistError)) or any(
        s in text for s in ("Timed out", "timed out", "Connection closed", "Connection reset"))
    return secondary, text
