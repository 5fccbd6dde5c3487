"""What a results folder holds of a grid: the stored cells, what is left, what failed.

Read-only queries of the store, for ``ablate run``, ``ablate table`` and the launchers.
One rule says which stored result belongs to a cell (``stored_key``): a measurement whose
key names the device (timing) may have been measured on another machine (a GPU node's
folder read on a laptop), and is then read from the key that the cell's runner stored.
"""
from __future__ import annotations

from collections import Counter

from .cell import cell_id, device_dependent, measurement_key
from .grid import Grid
from .runner import cell_keys, describe
from .store import Store


def stored_key(store: Store, name: str, key_here: str, record: dict | None) -> str:
    """The key to read for measurement ``name`` of a cell: ``key_here`` (its key resolved on
    this machine) if that has a result or does not depend on the device, else the key the
    cell's stored ``record`` names (measured on another machine), if any."""
    if not device_dependent(name) or store.result(key_here) is not None:
        return key_here
    return ((record or {}).get("measurements") or {}).get(name) or key_here


def grid_cells(store: Store, grid: Grid) -> list[dict]:
    """The records of the grid's cells that are in the folder, in the grid's order, with the
    measurements this grid asks for (another grid sharing a cell may have asked for more),
    each under the key ``stored_key`` reads."""
    stored = {c["id"]: c for c in store.cells()}
    out = []
    for index, config in enumerate(grid.cells):
        record = stored.get(cid := cell_id(config))
        if record is None:
            continue
        keys = {n: stored_key(store, n, k, record) for n, k in cell_keys(config).items()}
        out.append({"id": cid, "index": index, "config": config, "measurements": keys})
    return out


def pending(grid: Grid, store: Store, retry_failed: bool = False, *,
            here: bool = True) -> list[tuple[dict, list[str]]]:
    """The grid's cells with something left to measure, and what: each measurement without
    a result (or a failed one, with ``retry_failed``).

    ``here=True``: what runners on this machine will measure (the keys resolved here).
    ``here=False``: the cells run on other machines (a SLURM login node asks for its compute
    nodes), so each result is looked up by ``stored_key``."""
    stored = {} if here else {c["id"]: c for c in store.cells()}
    out = []
    for config in grid.cells:
        record = stored.get(cell_id(config))
        left = []
        for name, key in cell_keys(config).items():
            if not here:
                key = stored_key(store, name, key, record)
            res = store.result(key)
            if res is None or (retry_failed and res.get("status") == "failed"):
                left.append(name)
        if left:
            out.append((config, left))
    return out


def failures(grid: Grid, store: Store) -> list[tuple[str, str, str]]:
    """(cell, measurement, error) of every failed measurement of the grid, from the store."""
    out = []
    for record in grid_cells(store, grid):
        for name, key in record["measurements"].items():
            res = store.result(key)
            if res is not None and res.get("status") == "failed":
                out.append((describe(record["config"], grid.axes), name, res.get("error", "")))
    return out


def holdings(store: Store) -> str:
    """'4 cells of grid 'quick', 2 cells of grid 'other'' for a message."""
    count = Counter(name for c in store.cells() for name in (c.get("grids") or ["(unnamed)"]))
    if not count:
        return "no cells"
    return ", ".join(f"{n} cells of grid {name!r}" for name, n in count.most_common())


def trained(store: Store):
    """Whether a cell's measurement ``name`` is done already (ok) in ``store``: it runs no more."""
    return lambda config, name: (store.result(measurement_key(config, name)) or {}).get("status") == "ok"
