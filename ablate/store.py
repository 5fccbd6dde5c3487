"""The results store of one grid: a folder that survives ``kill -9`` and concurrent runners.

    results/<name>/
      cells/<cell_id>.json                # a cell's canonical settings and measurement keys
      measurements/<measure>-<key>.json   # one result, keyed by a hash of its inputs
      work/<measure>-<key>/               # checkpoints and samples of long measurements
      locks/<measure>-<key>.lock          # held (fcntl) while a process measures it
      table.csv, table.md                 # the table (write_tables), rewritten after each run

Every file is written whole or not at all (temporary file, fsync, rename). A measurement
is claimed with a POSIX lock, which the kernel releases when its process dies however it
dies, so nothing is ever stale and two runners never measure the same thing.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ----- cells ------------------------------------------------------------------
    def cell_path(self, cell_id: str) -> Path:
        return self.root / "cells" / f"{cell_id}.json"

    def save_cell(self, cell_id: str, config: dict, keys: dict[str, str], index: int = 0) -> None:
        path = self.cell_path(cell_id)
        record = {"id": cell_id, "index": index, "config": config, "measurements": keys}
        if path.exists():
            try:
                if json.loads(path.read_text()) == json.loads(json.dumps(record, default=str)):
                    return
            except (OSError, json.JSONDecodeError):
                pass
        write_json(path, record)

    def cells(self) -> list[dict]:
        out = []
        for p in sorted((self.root / "cells").glob("*.json")):
            with contextlib.suppress(OSError, json.JSONDecodeError):
                out.append(json.loads(p.read_text()))
        return out

    # ----- measurements -----------------------------------------------------------
    def result_path(self, key: str) -> Path:
        return self.root / "measurements" / f"{key}.json"

    def result(self, key: str) -> dict | None:
        try:
            return json.loads(self.result_path(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # unreadable counts as not measured; atomic writes make this rare

    def save_result(self, key: str, result: dict) -> None:
        write_json(self.result_path(key), result)

    def workdir(self, key: str) -> Path:
        return self.root / "work" / key

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[bool]:
        """Yields True with the measurement locked to this process, False if another holds it."""
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.uname().nodename} {os.getpid()}\n".encode())
                yield True
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # ----- the table --------------------------------------------------------------
    def table(self) -> pd.DataFrame:
        """One row per cell: flattened settings, every scalar metric, status, errors. A metric
        named like a column the row already has (a result stored before the runner refused
        such names) is kept as ``<measure>:<metric>``, never dropped."""
        rows = []
        for cell in self.cells():
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
        has; ``error`` only when some cell failed); returns the table."""
        df = self.table()
        write_atomic(self.root / "table.csv", df.to_csv(index=False))
        write_atomic(self.root / "table.md", df[shown_columns(df, columns)].to_markdown(index=False, floatfmt=".4g") + "\n")
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
