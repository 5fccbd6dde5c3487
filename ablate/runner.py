"""Run a grid: every cell's pending measurements, each claimed, measured, stored once.

A failing measurement (exception, NaN, out of memory, a metric named like a setting or
like another measurement's metric) becomes a stored result with status ``failed`` and its
error (where the disk allows writing it: a full disk or a read-only folder fails the
measurement in one line), and the other cells go on. Ctrl-C or ``kill -9`` loses at most
the measurement in flight: its lock dies with the process and a re-run redoes only it
(training resumes from its last checkpoint). What another process holds is waited for
after everything else, for a bounded time, and what is still held then is ``busy``.
"""
from __future__ import annotations

import inspect
import math
import sys
from typing import Callable
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from .cell import Cell, Needed, cell_id, label, measurement_key
from .defaults import WAIT_S
from .env import environment
from .grid import Grid
from .measure import MEASURES, Measurement
from .settings import one_line
from .store import Store, flatten
from .watch import Target, backends


@dataclass
class Summary:
    measured: int = 0  # measurements done by this process
    reused: int = 0  # found already done
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (cell, measure, error)
    busy: list[tuple[str, str]] = field(default_factory=list)  # held by another process


@dataclass
class CellMeasurement:
    """One measurement of one cell: what a runner claims, measures and stores."""

    config: dict
    cell_id: str
    keys: dict[str, str]  # measurement name -> result key, for the cell's every measurement
    name: str
    axes: dict[str, list] = field(default_factory=dict)  # the grid's axes, to name the cell

    @property
    def key(self) -> str:
        return self.keys[self.name]

    @property
    def label(self) -> str:
        return describe(self.config, self.axes)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cell_keys(config: dict) -> dict[str, str]:
    return {name: measurement_key(config, name) for name in config["measure"]}


def describe(config: dict, axes: dict[str, list]) -> str:
    """A cell as a person finds it in the grid file: model, block, seed and every other axis
    that varies (``DiT-S/2 adaln seed=0 train.lr=0.0003``)."""
    parts = [label(config)]
    for axis, values in axes.items():
        if len(values) < 2 or axis in ("model", "size", "patch_size", "block", "seed"):
            continue
        value = _dotted(config, axis)
        if isinstance(value, dict):  # a whole section as an axis: the keys its values set
            keys = sorted({k for v in values if isinstance(v, dict) for k in v})
            parts += [f"{axis}.{k}={value.get(k)}" for k in keys]
        else:
            parts.append(f"{axis}={value}")
    return " ".join(parts)


def _dotted(config: dict, key: str):
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _store_error(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    return f"cannot write the results folder{where}: {err.strerror or err}"


def run_here(m: Measurement, cell: Cell, progress: bool) -> dict:
    """Measure in this process: the default ``execute`` (under torchrun,
    ``ablate.torchrun.execute`` runs a distributed measurement on every rank)."""
    return m.fn(cell, progress=progress) if _takes_progress(m.fn) else m.fn(cell)


class StopsRun(RuntimeError):
    """A failure after which this process must measure nothing more (another rank may be
    stuck in a collective): it is recorded, then ``run_grid`` raises RunStopped."""


def run_grid(grid: Grid, store: Store, *, retry_failed: bool = False, progress: bool = True,
             wait_s: float = WAIT_S, worker: tuple[int, int] = (0, 1),
             on_event: Callable[[str, CellMeasurement], None] | None = None, only: set[str] | None = None,
             execute: Callable[[Measurement, Cell, bool], dict] = run_here) -> Summary:
    """Measure what is left of ``grid``; then wait up to ``wait_s`` seconds for what other
    processes hold (measuring what they leave undone); what is still held is ``busy``.

    ``worker=(i, n)``: this runner is worker i of n on the store (``ablate run --jobs n``);
    it takes cells i, i+n, i+2n, ... first and then the rest, so the workers start on
    different cells and the claims keep them apart. ``only``: just these cell ids.
    ``execute(measurement, cell, progress)``: how a measurement runs (``run_here``, or over
    the ranks of a torchrun launch: ``ablate.torchrun.execute``)."""
    runner = Runner(store, retry_failed=retry_failed, progress=progress, on_event=on_event, execute=execute)
    cells = []
    for index, config in enumerate(grid.cells):
        cid, keys = cell_id(config), cell_keys(config)
        if only is not None and cid not in only:
            continue
        try:
            store.save_cell(cid, config, keys, index, grid=grid.name)
        except OSError as err:  # a full disk, a read-only folder: this cell cannot run
            runner.summary.failed.append((describe(config, grid.axes), "cell", _store_error(err)))
            continue
        cells.append((config, cid, keys))
    i, n = worker
    cells = cells[i::n] + [c for j, c in enumerate(cells) if j % n != i]
    held = []
    bar = tqdm(cells, desc=grid.name, unit="cell", disable=not progress, dynamic_ncols=True)
    for config, cid, keys in bar:
        bar.set_postfix_str(describe(config, grid.axes))
        for name in config["measure"]:
            step = CellMeasurement(config, cid, keys, name, grid.axes)
            if not runner.measure(step):
                held.append(step)
    bar.close()
    if held and wait_s > 0:
        print(f"waiting up to {wait_s:g} s for {len(held)} measurement(s) another process holds",
              file=sys.stderr, flush=True)
    deadline = time.monotonic() + wait_s
    for step in held:
        if not runner.measure(step, wait_s=max(0.0, deadline - time.monotonic())):
            runner.summary.busy.append((step.label, step.name))
    return runner.summary


class Runner:
    """Measures steps into a store: skips what is done, claims what is not, records the rest."""

    def __init__(self, store: Store, *, retry_failed: bool = False, progress: bool = True,
                 on_event: Callable[[str, CellMeasurement], None] | None = None,
                 execute: Callable[[Measurement, Cell, bool], dict] = run_here):
        self.store, self.retry_failed, self.progress, self.execute = store, retry_failed, progress, execute
        self.on_event = on_event or (lambda event, step: None)  # ("start" | "ok" | "failed", step)
        self.started = now()
        self.summary = Summary()
        self.stopped: str | None = None  # why a measurement ended the run (StopsRun)

    def measure(self, step: CellMeasurement, wait_s: float = 0.0) -> bool:
        """Measure the step unless it is done; False if another process holds it (or a
        prerequisite) after ``wait_s`` seconds. A results folder that cannot be written
        fails the step in one line."""
        try:
            return self._measure(step, wait_s)
        except OSError as err:  # the store itself: a full disk, a read-only folder, a planted link
            self.summary.failed.append((step.label, step.name, _store_error(err)))
            return True

    def _measure(self, step: CellMeasurement, wait_s: float) -> bool:
        if self._reuse(step):
            return True
        deadline = time.monotonic() + wait_s
        for dep in MEASURES.get(step.name).needs:  # one another runner measures: wait for it first
            if self.store.result(step.keys[dep]) is None and wait_s > 0:
                with self.store.claim(step.keys[dep], max(0.0, deadline - time.monotonic())):
                    pass
        with self.store.claim(step.key, max(0.0, deadline - time.monotonic())) as mine:
            if not mine:
                return False
            if self._reuse(step):  # another process may have finished it before we locked
                return True
            found = self._prerequisites(step)
            if found is None:
                return False
            self.on_event("start", step)
            record = self._run(step, *found)
            try:
                self.store.save_result(step.key, record)
            except OSError as err:  # the disk is full now: say what happened, go on with the next
                self.summary.failed.append((step.label, step.name,
                                            f"{record.get('error') or 'measured'}; not recorded: {_store_error(err)}"))
                return True
            self.on_event(record["status"], step)
            if self.stopped:
                raise RunStopped(f"{step.label}: {step.name}: {self.stopped}")
            if record["status"] == "ok":
                self.summary.measured += 1
            else:
                self.summary.failed.append((step.label, step.name, record["error"]))
            return True

    def _reuse(self, step: CellMeasurement) -> bool:
        """Whether the step's stored result stands: ok, or failed and not to be retried, or
        retried by another runner since this one started. Counts it if so."""
        res = self.store.result(step.key)
        problem = _stored_problem(res, step) if res is not None and res["status"] == "ok" else None
        if problem:
            self.store.discard_result(step.key, problem)
            return False
        retried_since = res is not None and res.get("finished", "") >= self.started
        if res is None or (res["status"] == "failed" and self.retry_failed and not retried_since):
            return False
        self.summary.reused += 1
        if res["status"] == "failed":
            self.summary.failed.append((step.label, step.name, res.get("error", "")))
        return True

    def _prerequisites(self, step: CellMeasurement) -> tuple[dict[str, Needed], list[str]] | None:
        """The results of the measurements the step needs, and those that failed; None if
        one has no result because another runner holds it (``run_grid`` comes back to it)."""
        needed, failed = {}, []
        for dep in MEASURES.get(step.name).needs:
            res = self.store.result(step.keys[dep])
            if res is None:
                return None
            if res["status"] != "ok":
                failed.append(dep)
            else:
                key = step.keys[dep]
                needed[dep] = Needed(res["metrics"], self.store.workdir(key), self.store.result_path(key))
        return needed, failed

    def _watch(self, step: CellMeasurement) -> Target:
        """Where the step's live values go: the cell's TensorBoard folder (by its label) and
        W&B run (one per trained cell, grouped by the results folder's name, the grid's by
        default), its settings as hyperparameters with its cost where flops is measured."""
        hparams = {k: v for k, v in flatten(step.config).items() if k != "measure"}
        cost = self.store.result(step.keys["flops"]) if "flops" in step.keys else None
        if cost is not None and cost["status"] == "ok":
            hparams.update({f"cost.{k}": cost["metrics"][k] for k in ("gflops", "params_m") if k in cost["metrics"]})
        return Target(self.store.root, step.label, step.keys.get("train", step.key), self.store.root.resolve().name,
                      hparams, backends(), self.store.workdir(step.key))

    def _run(self, step: CellMeasurement, needed: dict[str, Needed], failed: list[str]) -> dict:
        """Measure the step; its record, ok or failed."""
        m = MEASURES.get(step.name)
        cell = Cell(step.config, self.store.workdir(step.key), needed)
        cell.watch = self._watch(step)  # live curves and progress (ablate.watch)
        record = {"measure": step.name, "key": step.key, "cell_id": step.cell_id, "started": now()}
        t0 = time.perf_counter()
        try:
            if failed:
                raise RuntimeError(f"needs {', '.join(failed)}, which did not succeed")
            if step.config["threads"]:
                torch.set_num_threads(step.config["threads"])
            record["env"] = environment(cell.device)
            metrics = self.execute(m, cell, self.progress)
            _check_metrics(metrics, step, self.store)
            record.update(status="ok", metrics=metrics)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001  -- any failure becomes a row
            error = "out of memory" if isinstance(err, torch.cuda.OutOfMemoryError) else one_line(err, with_type=True)
            record.update(status="failed", error=error, traceback=traceback.format_exc(), metrics={})
            if isinstance(err, StopsRun):
                self.stopped = str(err)  # recorded; the run must end (ablate.torchrun)
        record["finished"] = now()
        record["wall_s"] = round(time.perf_counter() - t0, 3)
        return record


class RunStopped(RuntimeError):
    """A measurement failed with StopsRun (and was recorded): the torchrun launch must end,
    since another rank may be stuck in a collective. Its ``str`` says which and why."""


class MetricNameClash(ValueError):
    """A metric named like a setting column or like another measurement's metric in the cell."""


def _stored_problem(res: dict, step: CellMeasurement) -> str | None:
    """Why a stored ok result cannot be what its measurement returned: a declared column
    that is not a number (nor text, where declared so), or a metric named like a setting
    (which ``_check_metrics`` refuses when measuring)."""
    m = MEASURES.get(step.name)
    metrics = res["metrics"]
    for col in m.columns:
        v = metrics.get(col)
        if v is None:
            continue  # not measured (an older record), shown empty
        if col in m.text_columns:
            if not isinstance(v, str):
                return f"metric {col} is {str(v)[:40]!r}, not text"
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"metric {col} is {str(v)[:40]!r}, not a number"
    clash = sorted(set(metrics) & set(flatten(step.config)))
    if clash:
        return f"metric {clash[0]!r} is also the name of a setting"
    return None


def _check_metrics(metrics: dict, step: CellMeasurement, store: Store) -> None:
    """Refuse a non-finite metric, or one whose name another column of the cell's row has
    (the table would show one value for two things)."""
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"{k} is {v}")
    settings = flatten(step.config)
    for k in metrics:
        if k in settings:
            raise MetricNameClash(f"metric {k!r} is also the name of a setting; prefix it ({step.name}_{k})")
    for other, key in step.keys.items():
        res = store.result(key) if other != step.name else None
        clash = sorted(set(metrics) & set((res or {}).get("metrics", {})))
        if clash:
            raise MetricNameClash(f"metric {clash[0]!r} is also a metric of {other}; prefix it "
                                  f"({step.name}_{clash[0]})")


def _takes_progress(fn) -> bool:
    return "progress" in inspect.signature(fn).parameters
