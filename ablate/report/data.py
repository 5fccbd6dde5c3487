"""What a report reads from a results folder: one ``CellResult`` per cell, and the tables the
figures draw (one row per cell, per logged training window, per FID evaluation).

Only the Store's public interface is used (cells, result, workdir), so the report reads any
results folder that ``ablate run`` wrote, finished or not: a pending or failed measurement is
simply absent from the cell's metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..defaults import SAMPLE_GRIDS
from ..reference import paper_row
from ..store import Store, flatten

# Settings that say which block and seed a cell is; every other setting that differs
# between the cells of a grid names a "variant" (a model size, a patch size, a learning rate).
BLOCK, SEED = "block", "seed"
# Implied by ``model`` (DiT-S/2 is size S, patch 2); naming them again would only clutter labels.
IMPLIED_BY_MODEL = ("size", "patch_size")
NOT_A_SETTING = ("measure",)


class ReportError(ValueError):
    """Input a report cannot be made from; ``str()`` is the one line the CLI prints."""


@dataclass
class CellResult:
    id: str
    index: int
    config: dict
    metrics: dict = field(default_factory=dict)  # every successful measurement's metrics
    status: dict = field(default_factory=dict)  # measurement -> ok / failed / pending
    errors: dict = field(default_factory=dict)  # measurement -> one-line error
    env: dict = field(default_factory=dict)
    samples: Path | None = None  # the train work folder's last samples_step*.png

    @property
    def block(self) -> str:
        return self.config.get(BLOCK, "?")

    @property
    def seed(self) -> int:
        return self.config.get(SEED, 0)


def read_cells(store: Store, cell_ids: set[str] | None = None) -> list[CellResult]:
    """The cells of ``store`` (only ``cell_ids`` if given), in the grid file's order."""
    out = []
    for rec in store.cells():
        if cell_ids is not None and rec["id"] not in cell_ids:
            continue
        cell = CellResult(rec["id"], rec.get("index", 0), rec["config"])
        for name, key in rec.get("measurements", {}).items():
            res = store.result(key)
            if res is None:
                cell.status[name] = "pending"
                continue
            cell.status[name] = res.get("status", "ok")
            if cell.status[name] != "ok":
                cell.errors[name] = res.get("error", "")
                continue
            for k, v in res.get("metrics", {}).items():
                cell.metrics.setdefault(k, v)
            for k, v in res.get("env", {}).items():
                cell.env.setdefault(k, v)
            if name == "train":
                grids = sorted(store.workdir(key).glob(SAMPLE_GRIDS))  # zero-padded steps
                cell.samples = grids[-1] if grids else None
        out.append(cell)
    return sorted(out, key=lambda c: (c.index, c.id))


def variant_keys(cells: list[CellResult]) -> list[str]:
    """The settings (flattened, dotted) that differ between cells, other than block and seed."""
    flat = [flatten(c.config) for c in cells]
    keys = []
    for k in dict.fromkeys(k for f in flat for k in f):
        if k in (BLOCK, SEED) or k in NOT_A_SETTING:
            continue
        if len({repr(f.get(k)) for f in flat}) > 1:
            keys.append(k)
    if "model" in keys:
        keys = [k for k in keys if k not in IMPLIED_BY_MODEL]
    return keys


def variant_label(config: dict, keys: list[str]) -> str:
    """``DiT-S/2``, or ``DiT-S/2, train.lr=0.001`` where more than the model varies."""
    flat = flatten(config)
    parts = [str(flat.get("model")) if k == "model" else f"{k}={flat.get(k)}" for k in keys]
    return ", ".join(parts) if parts else str(flat.get("model", "all cells"))


def cells_frame(cells: list[CellResult], keys: list[str]) -> pd.DataFrame:
    """One row per cell: id, block, seed, variant, model, patch size, ``other`` (the variant
    less the model), the paper's cost where the cell is one of its configs, every scalar metric."""
    rest = [k for k in keys if k not in ("model", *IMPLIED_BY_MODEL)]
    rows = []
    for c in cells:
        paper = paper_row(c.config) or {}
        row = {"cell_id": c.id, "block": c.block, "seed": c.seed, "variant": variant_label(c.config, keys),
               "model": c.config.get("model"), "patch_size": c.config.get("patch_size"),
               "other": variant_label(c.config, rest) if rest else "",
               "paper_gflops": paper.get("gflops"), "paper_params_m": paper.get("params_m")}
        row.update({k: v for k, v in c.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        rows.append(row)
    return pd.DataFrame(rows)


def series_frame(cells: list[CellResult], keys: list[str], metric: str) -> pd.DataFrame:
    """The list-valued metric ``metric`` (``log``, ``fid_over_steps``) of every cell as one long
    table: block, seed, variant, and the list entries' own columns (step, loss, fid, ...)."""
    rows = []
    for c in cells:
        for entry in c.metrics.get(metric) or []:
            if isinstance(entry, dict):
                rows.append({"cell_id": c.id, "block": c.block, "seed": c.seed,
                             "variant": variant_label(c.config, keys), **entry})
    return pd.DataFrame(rows)


def labels(cells: list[CellResult], name: str) -> list:
    """The distinct values of a label metric (``fid_extractor``, ...) over the cells that have it."""
    return list(dict.fromkeys(c.metrics[name] for c in cells if c.metrics.get(name) is not None))


@dataclass
class Results:
    """The cells of one report and what every figure reads from them."""

    cells: list[CellResult]
    keys: list[str]  # the settings that make variants
    table: pd.DataFrame  # cells_frame
    colors: dict[str, str]  # block -> colour, for every figure

    @classmethod
    def read(cls, store: Store, cell_ids: set[str] | None = None) -> "Results":
        from .palette import block_colors

        cells = read_cells(store, cell_ids)
        keys = variant_keys(cells)
        return cls(cells, keys, cells_frame(cells, keys), block_colors(c.block for c in cells))

    def series(self, metric: str) -> pd.DataFrame:
        return series_frame(self.cells, self.keys, metric)

    def labels(self, name: str) -> list:
        return labels(self.cells, name)

    def setting(self, dotted: str) -> list:
        """The distinct values of a setting (``train.steps``) over the cells."""
        values = {}
        for c in self.cells:
            flat = flatten(c.config)
            if dotted in flat:
                values.setdefault(repr(flat[dotted]), flat[dotted])
        return list(values.values())
