"""Run a grid: every cell's pending measurements, each claimed, measured, stored once.

A failing measurement (exception, NaN, out of memory) becomes a stored result with status
``failed`` and its error, and the other cells go on. Ctrl-C or ``kill -9`` loses at most
the measurement in flight: its lock dies with the process and a re-run redoes only it
(training resumes from its last checkpoint).
"""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from .env import environment
from .grid import Grid
from .measure import MEASURES
from .run import Run, label, measurement_key, run_id
from .store import Store


@dataclass
class Summary:
    measured: int = 0  # measurements done by this process
    reused: int = 0  # found already done
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (cell, measure, error)
    busy: list[tuple[str, str]] = field(default_factory=list)  # held by another process


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _one_line(err: BaseException) -> str:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _non_finite(metrics: dict) -> str | None:
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            return f"{k} is {v}"
    return None


def cell_keys(config: dict) -> dict[str, str]:
    return {name: measurement_key(config, name) for name in config["measure"]}


def run_grid(grid: Grid, store: Store, *, retry_failed: bool = False, progress: bool = True) -> Summary:
    summary = Summary()
    started_here = now()
    cells = [(c, run_id(c), cell_keys(c)) for c in grid.cells]
    for index, (config, rid, keys) in enumerate(cells):
        store.save_cell(rid, config, keys, index)
    bar = tqdm(cells, desc=grid.name, unit="cell", disable=not progress, dynamic_ncols=True)
    for config, rid, keys in bar:
        bar.set_postfix_str(label(config))
        for name in config["measure"]:
            _measure(config, rid, keys, name, store, summary, retry_failed, progress, started_here)
    bar.close()
    return summary


def _measure(config, rid, keys, name, store: Store, summary: Summary, retry_failed, progress,
             started_here: str = "") -> None:
    key = keys[name]

    def done(res):
        return res is not None and (res["status"] == "ok" or not retry_failed)

    res = store.result(key)
    if done(res):
        summary.reused += 1
        if res["status"] == "failed":
            summary.failed.append((label(config), name, res.get("error", "")))
        return
    with store.claim(key) as mine:
        if not mine:
            summary.busy.append((label(config), name))
            return
        res = store.result(key)  # another process may have finished it before we locked
        if res is not None and (done(res) or res.get("finished", "") >= started_here):
            summary.reused += 1  # done, or retried by another runner since this one started
            if res["status"] == "failed":
                summary.failed.append((label(config), name, res.get("error", "")))
            return
        m = MEASURES.get(name)
        needed, missing = {}, []
        for dep in m.needs:
            dep_res = store.result(keys[dep])
            if dep_res is None:  # another runner is still measuring it: come back later
                summary.busy.append((label(config), name))
                return
            if dep_res["status"] != "ok":
                missing.append(dep)
            else:
                needed[dep] = dep_res["metrics"]
        run = Run(config, store.workdir(key), needed)
        started, t0 = now(), time.perf_counter()
        record = {"measure": name, "key": key, "run_id": rid, "started": started}
        try:
            if missing:
                raise RuntimeError(f"needs {', '.join(missing)}, which did not succeed")
            if config["threads"]:
                torch.set_num_threads(config["threads"])
            record["env"] = environment(run.device)
            metrics = m.fn(run, progress=progress) if _takes_progress(m.fn) else m.fn(run)
            bad = _non_finite(metrics)
            if bad:
                raise FloatingPointError(bad)
            record.update(status="ok", metrics=metrics)
            summary.measured += 1
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001  -- any failure becomes a row
            record.update(status="failed", error=_one_line(err), traceback=traceback.format_exc(),
                          metrics={})
            summary.failed.append((label(config), name, record["error"]))
        record["finished"] = now()
        record["wall_s"] = round(time.perf_counter() - t0, 3)
        store.save_result(key, record)


def _takes_progress(fn) -> bool:
    import inspect

    return "progress" in inspect.signature(fn).parameters
