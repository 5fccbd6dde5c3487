"""The results store of one grid: a folder that survives ``kill -9`` and concurrent runners.

    results/<name>/
      cells/<cell_id>.json                # a cell's canonical settings, measurement keys, grids
      measurements/<measure>-<key>.json   # one result, keyed by a hash of its inputs
      work/<measure>-<key>/               # checkpoints and samples of long measurements
      locks/<measure>-<key>.lock          # held (fcntl) while a process measures it
      table.csv, table.md                 # the table (write_tables), rewritten after each run

Every path is made from names the store validates (a cell id is 12 hex digits, a measurement
key ``<measure>-<12 hex digits>``; a key read from a record is used only if it is one), and
every file is reached below the folder without following a symbolic link (``files``), so
nothing outside the folder is read, written, renamed or deleted. Every file is written whole
or not at all (a fresh temporary file, fsync, rename), with the permissions the umask gives;
temporary files a killed writer left are removed by the next run. A measurement is claimed
with a POSIX lock on a regular file of one link, which the kernel releases when its process
dies however it dies, so nothing is ever stale and two runners never measure the same thing.
Only regular files are read. A record that cannot be read (not UTF-8, not JSON, not a record
of the right shape: see ``_cell_problem``, ``_result_problem``) counts as missing: ``ablate
run`` renames it ``*.corrupt``, says so in one line on stderr, and measures it again;
``table`` and ``report`` only say so.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from . import files
from .files import LinkError, set_aside, write_atomic, write_json
from .settings import deep_merge

CELL_ID = re.compile(r"[0-9a-f]{12}")
# A measurement key names files (measurements/<key>.json, work/<key>/, locks/<key>.lock): the
# measurement's name, a dash, 12 hex digits. A key read from a record is used only if it is so.
KEY = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.+-]{0,100})-[0-9a-f]{12}")
MAX_RECORD_BYTES = 256 * 2**20
MAX_DEPTH = 64  # nesting of a record: settings sections and metric lists are a few levels deep


ENTRIES = ("cells", "measurements", "work", "locks", "slurm", "tensorboard", "table.csv", "table.md")  # all a run writes


class StoreError(OSError):
    """A results folder that cannot be used as it is (a file, a link in it): one line."""


def valid_key(key: object) -> bool:
    return isinstance(key, str) and KEY.fullmatch(key) is not None


def _checked_key(key: str) -> str:
    if not valid_key(key):
        raise ValueError(f"{key!r} is not a measurement key (<measure>-<12 hex digits>)")
    return key


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _depth(obj) -> int:
    """How deep ``obj`` nests (a scalar is 0), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((v, d + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _text_or_none(obj: dict, key: str) -> bool:
    return obj.get(key) is None or isinstance(obj[key], str)


def _result_problem(obj, path: Path) -> str | None:
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not a result"
    if obj.get("status") not in ("ok", "failed"):
        return f"status is {_short(obj.get('status'))}, not 'ok' or 'failed'"
    if not isinstance(obj.get("metrics"), dict) or not isinstance(obj.get("env", {}), dict):
        return "no metrics"
    if not all(isinstance(k, str) for k in (*obj["metrics"], *obj.get("env", {}))):
        return "a metric name that is not text"
    for key in ("started", "finished", "error", "measure", "key"):
        if not _text_or_none(obj, key):
            return f"{key} is {_short(obj[key])}, not text"
    if obj.get("key") is not None and obj["key"] != path.stem:
        return f"its key {_short(obj['key'])} is not its file name"
    if _depth(obj) > MAX_DEPTH:
        return f"nested more than {MAX_DEPTH} deep"
    return None


def _cell_problem(obj, path: Path) -> str | None:
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not a cell"
    if not isinstance(obj.get("id"), str) or not isinstance(obj.get("config"), dict):
        return "no id or settings"
    if obj["id"] != path.stem:
        return f"its id {_short(obj['id'])} is not its file name"
    ms = obj.get("measurements")
    if not isinstance(ms, dict):
        return "no measurement keys"
    for name, key in ms.items():
        m = KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None or m["name"] != name:
            return f"measurement {_short(name)} has the key {_short(key)}, not {name}-<12 hex digits>"
    measure = obj["config"].get("measure", [])
    if not isinstance(measure, list) or not all(isinstance(m, str) for m in measure):
        return f"config.measure is {_short(measure)}, not a list of measurement names"
    grids = obj.get("grids", [])
    if not isinstance(grids, list) or not all(isinstance(g, str) for g in grids):
        return f"grids is {_short(grids)}, not a list of grid names"
    index = obj.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool):
        return f"index is {_short(index)}, not an integer"
    if not all(isinstance(k, str) for k in obj["config"]):
        return "a setting name that is not text"
    if _depth(obj) > MAX_DEPTH:
        return f"nested more than {MAX_DEPTH} deep"
    return None


def _short(value, width: int = 60) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) or len(value) < 20 else f"a {type(value).__name__}"
    return text if len(text) <= width else text[:width - 3] + "..."


def merge_cells(old: dict | None, new: dict) -> dict:
    """A cell asked for by several grids: the union of their measurements and settings
    sections (they share the id, so they agree on every setting both have)."""
    if old is None:
        return new
    config = deep_merge(old["config"], new["config"])
    measure = list(new["config"].get("measure", []))
    measure += [m for m in old["config"].get("measure", []) if m not in measure]
    config["measure"] = measure
    return {"id": new["id"], "index": old.get("index", new.get("index", 0)), "config": config,
            "measurements": {**old["measurements"], **new["measurements"]},
            "grids": sorted(set(old.get("grids", [])) | set(new.get("grids", [])))}


class Store:
    def __init__(self, root: str | Path, *, set_aside: bool = True, warn_unreadable: bool = True):
        self.root = Path(root)
        # Rename unreadable records to *.corrupt (run); only warn of them (table, dry run), or
        # not even that (warn_unreadable=False: a torchrun follower's look, rank 0 warns).
        self.set_aside, self.warn_unreadable = set_aside, warn_unreadable
        self._reported: set[Path] = set()
        self._swept = False
        files.own(self.root)

    def read_only(self) -> "Store":
        """The same folder, read without setting anything aside (``table``, ``report``)."""
        return Store(self.root, set_aside=False, warn_unreadable=self.warn_unreadable)

    def check(self) -> None:
        """Refuse a results folder that is a file or holds a symbolic link among what the
        store writes (a planted link would have ``ablate run`` overwrite the file it points
        to; each write checks again, this says so once, up front)."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(errno.ENOTDIR, f"{self.root}: not a folder")
        if not self.root.is_dir():
            return
        top = os.path.realpath(self.root)
        for entry in ENTRIES:  # what the store writes, not whatever else a folder such as / holds
            p = os.path.join(self.root, entry)
            if "." not in entry and os.path.lexists(p) and not os.path.islink(p) and not os.path.isdir(p):
                raise StoreError(errno.ENOTDIR, f"{self.root}: {entry} is not a folder; the store keeps its "
                                 f"{entry} there (move it)")
            walked = [(self.root, [], [entry])] if os.path.islink(p) or not os.path.isdir(p) else os.walk(p)
            for folder, dirs, names in walked:
                for name in dirs + names:
                    q = os.path.join(folder, name)
                    if os.path.islink(q):
                        inside = os.path.commonpath([top, os.path.realpath(q)]) == top
                        where = ("inside the results folder, which holds no links" if inside
                                 else "outside the results folder")
                        raise StoreError(errno.ELOOP, f"{self.root}: {os.path.relpath(q, self.root)} is a symbolic "
                                         f"link to {os.readlink(q)}, {where}; remove it")

    # ----- records ----------------------------------------------------------------
    def _read(self, path: Path, problem_of: Callable, what: str) -> dict | None:
        try:
            obj = json.loads(files.read_text(path, MAX_RECORD_BYTES))
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            problem = "not UTF-8 text"
        except json.JSONDecodeError as e:
            problem = f"not JSON ({e.msg}, line {e.lineno})"
        except RecursionError:
            problem = "nested too deeply"
        except LinkError as e:
            problem = e.strerror.rpartition(": ")[2]
        except OSError as e:
            problem = "a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e))
        else:
            problem = problem_of(obj, path)
            if problem is None:
                return obj
        self._unreadable(path, problem, what)
        return None

    def discard_result(self, key: str, problem: str) -> None:
        """A result that reads as a record but cannot be its measurement's (``run`` checks
        its metrics): set aside as unreadable ones are, and measured again."""
        self._unreadable(self.result_path(key), problem, "it is measured again")

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

    def _sweep(self) -> None:
        """Before the first write: remove the temporary files that writers killed in this
        folder left behind (``files.remove_stale_temps``)."""
        if not self._swept:
            self._swept = True
            for sub in (self.root, self.root / "cells", self.root / "measurements"):
                files.remove_stale_temps(sub)

    # ----- cells ------------------------------------------------------------------
    def cell_path(self, cell_id: str) -> Path:
        if not isinstance(cell_id, str) or not CELL_ID.fullmatch(cell_id):
            raise ValueError(f"{cell_id!r} is not a cell id (12 hex digits)")
        return self.root / "cells" / f"{cell_id}.json"

    def save_cell(self, cell_id: str, config: dict, keys: dict[str, str], index: int = 0,
                  grid: str | None = None) -> None:
        """Record a cell, merged with what other grids asked of it; written only if that
        adds something (so a read-only folder with nothing left to do still runs)."""
        path = self.cell_path(cell_id)
        for key in keys.values():
            _checked_key(key)
        new = json.loads(json.dumps({"id": cell_id, "index": index, "config": config, "measurements": keys,
                                     "grids": [grid] if grid else []}, default=str))
        what = "the cell is recorded again when its grid runs"
        old = self._read(path, _cell_problem, what)
        if merge_cells(old, new) == old:
            return
        self._sweep()
        with self._locked(self.root / "locks" / f"cell-{cell_id}.lock"):  # read, merge, write: one at a time
            write_json(path, merge_cells(self._read(path, _cell_problem, what), new))

    def cells(self) -> list[dict]:
        out = []
        try:
            with files.folder(self.root / "cells") as d:
                names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
        except FileNotFoundError:
            return out
        for name in names:
            p = self.root / "cells" / name
            cell = self._read(p, _cell_problem, "the cell is recorded again when its grid runs")
            if cell is not None:
                out.append(cell)
        return out

    # ----- measurements -----------------------------------------------------------
    def result_path(self, key: str) -> Path:
        return self.root / "measurements" / f"{_checked_key(key)}.json"

    def result(self, key: str) -> dict | None:
        """The stored result, or None if not measured (or unreadable: then measured again)."""
        return self._read(self.result_path(key), _result_problem, "it is measured again")

    def save_result(self, key: str, result: dict) -> None:
        self._sweep()
        write_json(self.result_path(key), result)

    def workdir(self, key: str) -> Path:
        return self.root / "work" / _checked_key(key)

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        with files.open_lock(path) as fd:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield  # closing releases the lock

    @contextlib.contextmanager
    def claim(self, key: str, wait_s: float = 0.0) -> Iterator[bool]:
        """Yields True with the measurement locked to this process, False if another still
        holds it after ``wait_s`` seconds (polled: the holder may be on another host)."""
        path = self.root / "locks" / f"{_checked_key(key)}.lock"
        with files.open_lock(path) as fd:  # never a planted link, FIFO or hard link
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
                # Only the holder writes in its work folder: a temporary file there that no
                # writer holds is a killed writer's.
                files.remove_stale_temps(self.workdir(key), older_than_s=0)
                yield True
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)

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
                try:
                    old = files.read_bytes(path, MAX_RECORD_BYTES).decode("utf-8", errors="replace")
                except (FileNotFoundError, LinkError):
                    old = None
                if old != text:
                    self._sweep()
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
