"""Beyond one process: ``ablate run --jobs N`` (N worker processes on this machine) and
``ablate run --launcher submitit`` (one SLURM job-array task per pending cell).

Neither schedules anything itself. Every worker or task is a runner on the same results
folder, and the store's POSIX claims already let several runners split a grid: what one
claims, the others skip; what a dead one held, the next run redoes. So the parent here only
starts processes, gives each its GPU and its share of the CPU threads, shows what they do,
and reads the outcome back from the store.
"""
from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .device import resolve_device
from .grid import Grid
from .results import failures, pending
from .defaults import WAIT_S
from .runner import CellMeasurement
from .settings import ConfigError
from .store import Store

# A worker's stdout lines that start with this are for the parent, not the user.
EVENT = "@ablate "


# ---------------------------------------------------------------------------------
# --jobs N: worker processes on this machine
# ---------------------------------------------------------------------------------
@dataclass
class Plan:
    """How N workers share this machine."""

    jobs: int
    gpus: list[str]  # CUDA_VISIBLE_DEVICES entry of each worker; empty on CPU workers
    threads: int  # torch threads per worker where a cell does not set its own

    def env(self, i: int) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[i]
        return env


def visible_gpus() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES names them (indices or UUIDs)."""
    import torch

    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g for g in given.split(",") if g.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (taskset, cgroups)
    except AttributeError:
        return os.cpu_count() or 1


def plan(grid: Grid, jobs: int, jobs_per_gpu: int, gpus: list[str] | None = None, cores: int | None = None) -> Plan:
    """Worker i gets GPU i // jobs_per_gpu where the cells run on CUDA, and cores // jobs
    torch threads. Raises ConfigError (the option and what is wrong) on a plan that cannot work."""
    if jobs < 1:
        raise ConfigError("--jobs", f"{jobs} must be >= 1")
    if jobs_per_gpu < 1:
        raise ConfigError("--jobs-per-gpu", f"{jobs_per_gpu} must be >= 1")
    on_cuda = [c for c in grid.cells if resolve_device(c["device"]).type == "cuda"]
    for c in on_cuda:
        if c["device"] not in ("auto", "cuda"):
            raise ConfigError("device", f"{c['device']!r} pins one GPU; with --jobs use device auto or cuda, "
                              "and each worker gets its own GPU", file=grid.path)
    names: list[str] = []
    if on_cuda:
        gpus = visible_gpus() if gpus is None else gpus
        if jobs > len(gpus) * jobs_per_gpu:
            need = math.ceil(jobs / len(gpus))
            raise ConfigError("--jobs", f"{jobs} workers at {jobs_per_gpu} per GPU need {math.ceil(jobs / jobs_per_gpu)} "
                              f"GPUs, this machine has {len(gpus)}; use --jobs-per-gpu {need} or --jobs "
                              f"{len(gpus) * jobs_per_gpu}")
        names = [gpus[i // jobs_per_gpu] for i in range(jobs)]
    cores = cpu_cores() if cores is None else cores
    return Plan(jobs, names, max(1, cores // jobs))


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen
    running: str = ""  # "<cell label>: <measurement>" while it measures
    since: float = 0.0
    summary: dict = field(default_factory=dict)  # its Summary, sent when it ends
    stderr: deque = field(default_factory=lambda: deque(maxlen=20))  # the last lines, shown if it dies


@dataclass
class JobsSummary:
    measured: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    pending: int = 0  # measurements no worker finished (a worker died, or Ctrl-C)
    crashed: list[int] = field(default_factory=list)  # workers that exited with neither 0 nor 1
    interrupted: bool = False


def run_jobs(grid: Grid, results: Path, jobs: int, *, jobs_per_gpu: int = 1, retry_failed: bool = False,
             progress: bool = True, wait_s: float = WAIT_S, out=None) -> JobsSummary:
    """Run ``jobs`` ``ablate run --worker i/jobs`` processes on the grid's results folder and
    show what each measures; Ctrl-C (or SIGTERM) stops them all and keeps what is done."""
    import torch

    out = out or sys.stdout
    p = plan(grid, jobs, jobs_per_gpu)
    # Resolve the cells' keys as the workers will: a CPU timing's key names its thread count.
    torch.set_num_threads(p.threads)
    store = Store(results)
    todo = pending(grid, store, retry_failed)
    total = sum(len(left) for _, left in todo)
    base = [sys.executable, "-m", "ablate.cli", "run", grid.path, "--results", str(results), "--no-progress",
            "--wait", str(wait_s)]
    if retry_failed:
        base.append("--retry-failed")
    workers = []
    for i in range(jobs):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **p.env(i)}
        proc = subprocess.Popen([*base, "--worker", f"{i}/{jobs}"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        workers.append(Worker(i, proc))
    events: queue.Queue = queue.Queue()
    for w in workers:  # started after every Popen: preexec_fn and threads do not mix
        threading.Thread(target=_read, args=(w.proc.stdout, w.index, "out", events), daemon=True).start()
        threading.Thread(target=_read, args=(w.proc.stderr, w.index, "err", events), daemon=True).start()

    where = ", ".join(f"GPU {g}" for g in dict.fromkeys(p.gpus)) if p.gpus else "CPU"
    view = _View(grid.name, workers, total, progress and out.isatty(), out)
    view.note(f"{jobs} workers on {where}, {p.threads} torch thread{'s' * (p.threads > 1)} each; "
              f"{total} measurements of {len(todo)} cells to do")
    summary = JobsSummary()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM,)}
    try:
        open_streams = 2 * jobs
        while open_streams:
            try:
                i, kind, line = events.get(timeout=0.5)
            except queue.Empty:
                view.refresh()
                continue
            w = workers[i]
            if line is None:
                open_streams -= 1
            elif kind == "err":
                w.stderr.append(line)
            elif line.startswith(EVENT):
                _event(w, json.loads(line[len(EVENT):]), view)
            view.refresh()
        for w in workers:
            w.proc.wait()
    except KeyboardInterrupt:
        summary.interrupted = True
        view.note("interrupted: stopping the workers (what is done is kept; run again to finish)")
        _stop(workers)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        view.close()
    for w in workers:
        summary.measured += w.summary.get("measured", 0)
        if w.proc.returncode not in (0, 1) and not summary.interrupted:
            summary.crashed.append(w.index)
            tail = "\n".join(w.stderr)
            print(f"worker {w.index} exited with code {w.proc.returncode}:\n{tail}", file=sys.stderr)
    summary.failed = failures(grid, store)
    summary.pending = sum(len(left) for _, left in pending(grid, store, retry_failed=False))
    return summary


def _event(w: Worker, e: dict, view: "_View") -> None:
    if e["event"] == "start":
        w.running, w.since = f"{e['cell']}: {e['measure']}", time.time()
        view.line(w, "start")
    elif e["event"] == "summary":
        w.summary = e
    else:  # ok or failed
        view.line(w, e["event"])
        view.done += 1
        w.running = ""


def _read(stream, i: int, kind: str, events: queue.Queue) -> None:
    for line in stream:
        events.put((i, kind, line.rstrip("\n")))
    events.put((i, kind, None))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop(workers: list[Worker], grace_s: float = 15.0) -> None:
    """SIGINT to every worker (each stops its measurement, its lock dies with it), then
    SIGKILL to any still running after ``grace_s``."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGINT)
    deadline = time.time() + grace_s
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM when the parent dies, however it dies, so that
    no orphan keeps measuring after a kill -9 of ``ablate run --jobs``; and SIGINT as by
    default, so that a parent started with SIGINT ignored (``nohup``, ``&`` in a script)
    still stops its workers at once: Python keeps an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: workers finish their current measurement on their own


class _View:
    """What the workers do: on a terminal, a bar of the grid's measurements done and one
    line per worker; elsewhere (a log file, --no-progress) one line per event."""

    def __init__(self, name: str, workers: list[Worker], total: int, live: bool, out):
        self.workers, self.live, self.out, self.done = workers, live, out, 0
        self.bars = []
        if live:
            from tqdm.auto import tqdm

            self.main = tqdm(total=total, desc=name, unit="measurement", dynamic_ncols=True, file=out)
            self.bars = [tqdm(total=0, position=i + 1, bar_format="{desc}", file=out) for i in range(len(workers))]

    def note(self, text: str) -> None:
        if self.live:
            self.main.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def line(self, w: Worker, event: str) -> None:
        if not self.live:
            took = f" ({time.time() - w.since:.1f} s)" if event != "start" else ""
            print(f"[worker {w.index}] {event} {w.running}{took}", file=self.out, flush=True)

    def refresh(self) -> None:
        if not self.live:
            return
        self.main.n = self.done
        self.main.refresh()
        for w, bar in zip(self.workers, self.bars):
            state = (f"{w.running} ({time.time() - w.since:.0f} s)" if w.running else
                     "done" if w.proc.poll() is not None else "idle" if w.since else "starting")
            bar.set_description_str(f"  worker {w.index}: {state}")

    def close(self) -> None:
        for bar in reversed(self.bars):
            bar.close()
        if self.live:
            self.main.n = self.done
            self.main.close()


def worker_events(i: int):
    """The ``on_event`` a worker's runner calls: one event line per start and end on stdout."""

    def on_event(event: str, task: CellMeasurement) -> None:
        print(EVENT + json.dumps({"worker": i, "event": event, "cell": task.label, "measure": task.name}),
              flush=True)

    return on_event


def worker_summary(summary) -> None:
    print(EVENT + json.dumps({"event": "summary", "measured": summary.measured, "reused": summary.reused}),
          flush=True)
