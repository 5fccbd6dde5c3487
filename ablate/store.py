"""The results store of one grid: a folder that survives ``kill -9`` and concurrent runners.

    results/<name>/
      cells/<cell_id>.json                # a cell's canonical settings, measurement keys, grids
      measurements/<measure>-<key>.json   # one result, keyed by a hash of its inputs
      work/<measure>-<key>/               # checkpoints and samples of long measurements
      locks/<measure>-<key>.lock          # held (fcntl) while a process measures it
      table.csv, table.md                 # the table (write_tables), rewritten after each run

Every file is written whole or not at all (a fresh temporary file, fsync, rename), with the
permissions the umask gives, never through a symbolic link. A measurement is claimed with a
POSIX lock, which the kernel releases when its process dies however it dies, so nothing is
ever stale and two runners never measure the same thing. A record that cannot be read
(not UTF-8, not JSON, not a record) counts as missing: it is renamed ``*.corrupt``, said so
in one line on stderr, and measured again.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from .files import set_aside, write_atomic, write_json  # noqa: F401  -- write_json: re-exported


class StoreError(OSError):
    """A results folder that cannot be used as it is (a file, a link out of it): one line."""


def read_text_nofollow(path: Path) -> str:
    """The file's text, refusing a symbolic link (ELOOP) and bytes that are not UTF-8."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read().decode("utf-8")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _result_problem(obj) -> str | None:
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not a result"
    if obj.get("status") not in ("ok", "failed"):
        return f"status is {obj.get('status')!r}, not 'ok' or 'failed'"
    if not isinstance(obj.get("metrics"), dict) or not isinstance(obj.get("env", {}), dict):
        return "no metrics"
    return None


def _cell_problem(obj) -> str | None:
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not a cell"
    if not isinstance(obj.get("id"), str) or not isinstance(obj.get("config"), dict):
        return "no id or settings"
    ms = obj.get("measurements")
    if not isinstance(ms, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ms.items()):
        return "no measurement keys"
    return None


def merge_cells(old: dict | None, new: dict) -> dict:
    """A cell asked for by several grids: the union of their measurements and settings
    sections (they share the id, so they agree on every setting both have)."""
    if old is None:
        return new
    config = _deep_merge(old["config"], new["config"])
    measure = list(new["config"].get("measure", []))
    measure += [m for m in old["config"].get("measure", []) if m not in measure]
    config["measure"] = measure
    return {"id": new["id"], "index": old.get("index", new.get("index", 0)), "config": config,
            "measurements": {**old["measurements"], **new["measurements"]},
            "grids": sorted(set(old.get("grids", [])) | set(new.get("grids", [])))}


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Store:
    def __init__(self, root: str | Path, *, set_aside: bool = True, warn_unreadable: bool = True):
        self.root = Path(root)
        # Rename unreadable records to *.corrupt (run); only warn of them (table, dry run), or
        # not even that (warn_unreadable=False: a torchrun follower's look, rank 0 warns).
        self.set_aside, self.warn_unreadable = set_aside, warn_unreadable
        self._reported: set[Path] = set()

    def check(self) -> None:
        """Refuse a results folder that is a file or holds a symbolic link out of itself
        (a planted link would have ``ablate run`` overwrite the file it points to)."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(errno.ENOTDIR, f"{self.root}: not a folder")
        if not self.root.is_dir():
            return
        top = os.path.realpath(self.root)
        for folder, dirs, files in os.walk(self.root):
            for name in dirs + files:
                p = os.path.join(folder, name)
                if os.path.islink(p):
                    target = os.path.realpath(p)
                    if os.path.commonpath([top, target]) != top:
                        raise StoreError(errno.ELOOP, f"{self.root}: {os.path.relpath(p, self.root)} is a symbolic "
                                         f"link to {os.readlink(p)}, outside the results folder; remove it")

    # ----- records ----------------------------------------------------------------
    def _read(self, path: Path, problem_of: Callable, what: str) -> dict | None:
        try:
            obj = json.loads(read_text_nofollow(path))
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            problem = "not UTF-8 text"
        except json.JSONDecodeError as e:
            problem = f"not JSON ({e.msg}, line {e.lineno})"
        except OSError as e:
            problem = "a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e))
        else:
            problem = problem_of(obj)
            if problem is None:
                return obj
        self._unreadable(path, problem, what)
        return None

    def _unreadable(self, path: Path, problem: str, what: str) -> None:
        if path in self._reported:
            return
        self._reported.add(path)
        if not self.set_aside:
            if self.warn_unreadable:
                warn(f"{path}: unreadable ({problem}); counted as missing (`ablate run` keeps it aside and {what})")
            return
        try:
            aside = set_aside(path)
        except FileNotFoundError:
            return  # another runner moved it aside first
        except OSError as e:
            warn(f"{path}: unreadable ({problem}); counted as missing, could not keep it aside: {e.strerror}")
            return
        warn(f"{path}: unreadable ({problem}); kept as {aside.name}, {what}")

    # ----- cells ------------------------------------------------------------------
    def cell_path(self, cell_id: str) -> Path:
        return self.root / "cells" / f"{cell_id}.json"

    def save_cell(self, cell_id: str, config: dict, keys: dict[str, str], index: int = 0,
                  grid: str | None = None) -> None:
        """Record a cell, merged with what other grids asked of it; written only if that
        adds something (so a read-only folder with nothing left to do still runs)."""
        path = self.cell_path(cell_id)
        new = json.loads(json.dumps({"id": cell_id, "index": index, "config": config, "measurements": keys,
                                     "grids": [grid] if grid else []}, default=str))
        what = "the cell is recorded again when its grid runs"
        old = self._read(path, _cell_problem, what)
        if merge_cells(old, new) == old:
            return
        with self._locked(self.root / "locks" / f"cell-{cell_id}.lock"):  # read, merge, write: one at a time
            write_json(path, merge_cells(self._read(path, _cell_problem, what), new))

    def cells(self) -> list[dict]:
        out = []
        for p in sorted((self.root / "cells").glob("*.json")):
            cell = self._read(p, _cell_problem, "the cell is recorded again when its grid runs")
            if cell is not None:
                out.append(cell)
        return out

    # ----- measurements -----------------------------------------------------------
    def result_path(self, key: str) -> Path:
        return self.root / "measurements" / f"{key}.json"

    def result(self, key: str) -> dict | None:
        """The stored result, or None if not measured (or unreadable: then measured again)."""
        return self._read(self.result_path(key), _result_problem, "it is measured again")

    def save_result(self, key: str, result: dict) -> None:
        write_json(self.result_path(key), result)

    def workdir(self, key: str) -> Path:
        return self.root / "work" / key

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def claim(self, key: str, wait_s: float = 0.0) -> Iterator[bool]:
        """Yields True with the measurement locked to this process, False if another still
        holds it after ``wait_s`` seconds (polled: the holder may be on another host)."""
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # never a planted link
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.uname().nodename} {os.getpid()}\n".encode())
                yield True
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # ----- the table --------------------------------------------------------------
    def table(self, cells: list[dict] | None = None) -> pd.DataFrame:
        """One row per cell (every cell in the folder, or the given cell records):
        flattened settings, every scalar metric, status, errors. A metric named like a column
        the row already has (a result stored before the runner refused such names) is kept
        as ``<measure>:<metric>``, never dropped."""
        rows = []
        for cell in self.cells() if cells is None else cells:
            row = {"cell_id": cell["id"]}
            row.update(flatten(cell["config"]))
            statuses, errors, started, finished = [], [], [], []
            for name, key in cell["measurements"].items():
                res = self.result(key)
                if res is None:
                    statuses.append("pending")
                    continue
                statuses.append(res.get("status", "ok"))
                if res.get("error"):
                    errors.append(f"{name}: {res['error']}")
                started.append(res.get("started", ""))
                finished.append(res.get("finished", ""))
                for k, v in res.get("metrics", {}).items():
                    if _scalar(v):
                        row[f"{name}:{k}" if k in row else k] = v
                for k, v in res.get("env", {}).items():
                    row.setdefault(k, v)
            row["status"] = ("failed" if "failed" in statuses else
                             "pending" if "pending" in statuses else "ok")
            row["error"] = "; ".join(errors)
            row["started"] = min(started) if started else ""
            row["finished"] = max(finished) if finished and "pending" not in statuses else ""
            row["_index"] = cell.get("index", 0)
            rows.append(row)
        if not rows:
            return pd.DataFrame()
        # Rows in the grid file's order, not the hash order of the files.
        return pd.DataFrame(rows).sort_values(["_index", "cell_id"]).drop(columns="_index").reset_index(drop=True)

    def write_tables(self, columns: list[str]) -> pd.DataFrame:
        """Write ``table.csv`` (every column) and ``table.md`` (those of ``columns`` the table
        has; ``error`` only when some cell failed); returns the table. A table that has not
        changed is not rewritten (a read-only folder with nothing left to do runs), and one
        that cannot be written is said so in one line: the results themselves are stored."""
        df = self.table()
        texts = {"table.csv": df.to_csv(index=False),
                 "table.md": df[shown_columns(df, columns)].to_markdown(index=False, floatfmt=".4g") + "\n"}
        for name, text in texts.items():
            path = self.root / name
            try:
                if not path.is_file() or path.read_text(encoding="utf-8", errors="replace") != text:
                    write_atomic(path, text)
            except OSError as e:
                warn(f"{path}: not written: {e.strerror or e}")
        return df


def shown_columns(df: pd.DataFrame, columns: list[str]) -> list[str]:
    """Those of ``columns`` that ``df`` has, less an all-empty ``error``."""
    return [c for c in columns if c in df.columns and not (c == "error" and not df[c].any())]


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def flatten(d: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; lists become comma-joined text."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(map(str, v))
        else:
            out[key] = v
    return out
