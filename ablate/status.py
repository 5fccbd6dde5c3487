"""What every cell of a grid is doing now, read from its results folder alone (``ablate
status``): from any machine that sees the folder, starting nothing and writing nothing.

A measurement is done or failed when its result is stored; running while a process holds
its claim (a POSIX lock on ``locks/<key>.lock``, tested without taking it: F_GETLK), whose
file names the claimer's host and pid, and whose modification time is when it was claimed;
else pending (a holder that died released its lock with its life, so its cell is pending).
A running training run's last log window is its ``progress.json`` (``ablate.watch``): the
step, the rate, and from them the time left.
"""
from __future__ import annotations

import fcntl
import json
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cell import cell_id, device_dependent
from .grid import Grid
from .runner import cell_keys, describe
from .store import Store
from .watch import PROGRESS

STATES = ("running", "failed", "pending", "done")  # a cell's state: the first that one of its measurements has
# struct flock, as the kernel lays it out (F_GETLK reads and writes one)
_FLOCK = "qqihh" if sys.platform == "darwin" else "hhqqi4x"


@dataclass
class Holder:
    """The process holding a claim, as its lock file names it."""

    host: str
    pid: int | None
    since: float  # when it claimed (seconds since the epoch)


@dataclass
class Progress:
    """A training run's last log window."""

    step: int
    steps: int | None
    steps_per_s: float | None  # None: written by an earlier holder (this one has not logged yet)
    img_per_s: float | None
    time: float

    @property
    def left_s(self) -> float | None:
        if self.steps is None or not self.steps_per_s:
            return None
        return max(0, self.steps - self.step) / self.steps_per_s


@dataclass
class MeasurementStatus:
    name: str
    state: str  # done, failed, running, pending
    holder: Holder | None = None
    progress: Progress | None = None
    error: str = ""


@dataclass
class CellStatus:
    cell_id: str
    label: str
    measurements: list[MeasurementStatus] = field(default_factory=list)

    @property
    def state(self) -> str:
        states = {m.state for m in self.measurements}
        return next(s for s in STATES if s in states) if states else "pending"

    @property
    def running(self) -> MeasurementStatus | None:
        return next((m for m in self.measurements if m.state == "running"), None)


def grid_status(grid: Grid, store: Store) -> list[CellStatus]:
    """Each cell of ``grid`` with the state of each of its measurements, in the grid's order.
    A measurement whose key names the device (timing) is looked up under the key its runner
    stored (this machine may have another device, or none)."""
    stored = {c["id"]: c for c in store.cells()}
    out = []
    for config in grid.cells:
        cid = cell_id(config)
        record = stored.get(cid, {}).get("measurements", {})
        cell = CellStatus(cid, describe(config, grid.axes))
        for name, key in cell_keys(config).items():
            if device_dependent(name) and record.get(name):
                key = record[name]
            cell.measurements.append(measurement_status(store, name, key))
        out.append(cell)
    return out


def measurement_status(store: Store, name: str, key: str) -> MeasurementStatus:
    res = store.result(key)
    if res is not None:
        ok = res.get("status") == "ok"
        return MeasurementStatus(name, "done" if ok else "failed", error="" if ok else res.get("error", ""))
    who = holder(store.root / "locks" / f"{key}.lock")
    if who is None:
        return MeasurementStatus(name, "pending")
    return MeasurementStatus(name, "running", who, progress(store.workdir(key) / PROGRESS, who))


def holder(lock: Path) -> Holder | None:
    """Who holds the claim of ``lock``, or None if nobody does (or it was never claimed)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        query = _flock(fcntl.F_WRLCK)
        held = _flock_type(fcntl.fcntl(fd, fcntl.F_GETLK, query)) != fcntl.F_UNLCK
        if not held:
            return None
        text = os.read(fd, 4096).decode("utf-8", errors="replace").split()
        since = os.fstat(fd).st_mtime  # the claimer writes its host and pid as it claims
    finally:
        os.close(fd)
    pid = int(text[1]) if len(text) >= 2 and text[1].isdigit() else None
    return Holder(text[0] if text else "?", pid, since)


def _flock(kind: int) -> bytes:
    if _FLOCK == "qqihh":
        return struct.pack(_FLOCK, 0, 0, 0, kind, os.SEEK_SET)
    return struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)


def _flock_type(data: bytes) -> int:
    fields = struct.unpack(_FLOCK, data)
    return fields[3] if _FLOCK == "qqihh" else fields[0]


def progress(path: Path, who: Holder) -> Progress | None:
    """The progress file of a running measurement; its rate only if ``who`` wrote it (a
    resumed run's file is its predecessor's until its first window)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            p = json.loads(f.read().decode("utf-8"))
        step = int(p["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mine = p.get("host") == who.host and p.get("pid") == who.pid
    return Progress(step, p.get("steps"), p.get("steps_per_s") if mine else None,
                    p.get("img_per_s") if mine else None, float(p.get("time", 0)))


# ---------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------
def render(cells: list[CellStatus], root: Path, now: float | None = None) -> str:
    """The status as a table, one row per cell, and a count of each state."""
    from tabulate import tabulate

    now = time.time() if now is None else now
    rows = []
    for c in cells:
        m = c.running
        who = m.holder if m else None
        p = m.progress if m else None
        rows.append([
            c.cell_id, c.label, c.state, ", ".join(f"{x.name} {x.state}" for x in c.measurements),
            f"{who.host} pid {who.pid}" if who else "",
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(who.since))} ({duration(now - who.since)} ago)"
            if who else "",
            (f"{p.step}/{p.steps}" if p.steps else str(p.step)) if p else "",
            _rate(p) if p else "",
            duration(p.left_s) if p and p.left_s is not None else "",
        ])
    table = tabulate(rows, headers=["cell_id", "cell", "status", "measurements", "holder", "since", "step",
                                    "rate", "left"])
    counts = {s: sum(c.state == s for c in cells) for s in STATES}
    failed = [(c.label, x.name, x.error) for c in cells for x in c.measurements if x.state == "failed"]
    lines = [table, "", f"{len(cells)} cells: {counts['done']} done, {counts['running']} running, "
             f"{counts['failed']} failed, {counts['pending']} pending; results in {root}"]
    lines += [f"failed: {label}: {name}: {error}" for label, name, error in failed]
    return "\n".join(lines)


def _rate(p: Progress) -> str:
    if p.steps_per_s is None:
        return "(resuming)"
    return f"{p.steps_per_s:.3g} steps/s, {p.img_per_s:.4g} img/s"


def duration(seconds: float) -> str:
    """45 s, 12 min, 3.2 h, 2.1 d."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
