"""``ablate table``: a grid's results as one table, queried, sorted, pivoted."""
from __future__ import annotations

from pathlib import Path

import click

from ..settings import one_line
from .common import FORMATS, fail, folder_option, load, open_store, print_table, results_dir, unknown_grid


@click.command()
@click.argument("grid", required=False)
@click.option("--results", metavar="DIR", callback=folder_option, help="Results folder (default: results/<grid name>).")
@click.option("--query", "-q", metavar="EXPR",
              help="Rows where EXPR is true, e.g. \"block == 'adaln-zero' and patch_size == 2\": column "
                   "names, literals, comparisons, in, and/or/not, arithmetic; nothing else.")
@click.option("--columns", "-c", metavar="COLS",
              help="Comma-separated columns (default: a summary; 'all' for every column).")
@click.option("--pivot", metavar="INDEX:COLUMNS:VALUES", help="e.g. model:block:gflops.")
@click.option("--sort", metavar="COLS", help="Comma-separated columns to sort by.")
@click.option("--format", "-f", "fmt", type=click.Choice(FORMATS), default="markdown", show_default=True)
@click.option("--output", "-o", metavar="FILE", help="Write to FILE instead of the terminal.")
def table(grid, results, query, columns, pivot, sort, fmt, output):
    """Show the results of GRID (default: quick) as one table, one row per cell; with
    --results DIR and no GRID, every cell in DIR.

    Columns are the cell's settings (model, block, patch_size, seed, train.lr, ...), every
    metric (gflops, params, fwd_ms, step_img_per_s, final_loss, ...), status, error and
    the environment (device_name, torch_version, git_rev, ...).
    """
    import pandas as pd

    from ..grid import EXPERIMENTS, find_grid
    from ..results import grid_cells, holdings

    if grid is None and results is not None:
        g = None  # every cell in the folder
    else:
        g = load(grid) if find_grid(grid).is_file() else None
    named_only = results is None
    store = open_store(results_dir(results, g.name if g else str(grid)), set_aside=False)
    if not (store.root / "cells").is_dir():
        if grid is not None and g is None and named_only:  # a name that is neither a grid nor a results folder
            unknown_grid(grid, sorted({p.stem for p in EXPERIMENTS.glob("*.yaml")}
                                      | {p.name for p in Path("results").glob("*") if (p / "cells").is_dir()}))
        fail(f"{store.root}: no results here (run `ablate run` first, or pass --results DIR)")
    if g is None:
        df = store.table()
    else:  # the grid's cells as the file now defines them, with what it asks of them
        cells = grid_cells(store, g)
        if not cells:
            fail(f"{store.root}: none of the {len(g.cells)} cells of grid {g.name!r} is here; "
                 f"it holds {holdings(store)} (`ablate table --results {store.root}` shows them all)")
        df = store.table(cells)
    if query is not None:
        from ..query import QueryError, filter_rows

        rows = len(df)
        try:
            df = filter_rows(df, query)
        except QueryError as e:
            fail(f"--query {query!r}: {e}")
        if df.empty:  # said, not a bare header: exit 1, as grep does when nothing matches
            fail(f"no rows match {query!r} (of {rows})", 1)
    if sort:
        keys = sort.split(",")
        _check_columns(keys, df, "--sort")
        df = df.sort_values(keys)
    if pivot:
        df, columns = _pivot(df, pivot, columns)
    if columns == "all":
        cols = list(df.columns)
    elif columns:
        cols = columns.split(",")
        _check_columns(cols, df, "--columns")
    else:
        cols = None
    print_table(df, cols, fmt, output)


def _pivot(df, pivot: str, columns):
    import pandas as pd

    parts = pivot.split(":")
    if len(parts) != 3 or len(set(parts)) != 3:
        fail(f"--pivot {pivot!r}: expected INDEX:COLUMNS:VALUES, three different columns, e.g. model:block:gflops")
    _check_columns(parts, df, "--pivot")
    numeric = pd.api.types.is_numeric_dtype(df[parts[2]])
    try:
        df = pd.pivot_table(df, index=parts[0], columns=parts[1], values=parts[2],
                            aggfunc="mean" if numeric else "first", sort=False).reset_index()
    except (TypeError, ValueError) as e:
        fail(f"--pivot {pivot!r}: {one_line(e)}")
    df.columns = [str(c) for c in df.columns]
    return df, ",".join(df.columns) if columns is None else columns


def _check_columns(cols, df, option):
    from ..registry import did_you_mean

    for c in cols:
        if c not in df.columns:
            fail(f"{option}: no column {c!r}{did_you_mean(c, [str(x) for x in df.columns])}")
