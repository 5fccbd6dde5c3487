"""``ablate report``: a grid's figures and tables as report.md, report.html, PNG and SVG."""
from __future__ import annotations

from pathlib import Path

import click

from .common import fail, folder_option, load, open_store, results_dir


@click.command()
@click.argument("grid", required=False)
@click.option("--results", metavar="DIR", callback=folder_option, help="Results folder (default: results/<grid name>).")
@click.option("--out", metavar="DIR", callback=folder_option, help="Report folder (default: reports/<grid name>).")
@click.option("--progress/--no-progress", default=True, help="Progress bar (default: on).")
def report(grid, results, out, progress):
    """Write the report of GRID (default: quick): report.md, a self-contained report.html, and
    each figure as PNG and SVG.

    \b
    FID over training steps per block design, Gflops against FID, cost beside the paper's
    Table 4, loss curves and samples, and a summary (mean ± std over seeds) saying whether
    the paper's ordering of the blocks held. Figures a grid has no metrics for are left out
    with the reason. A GRID that is not a file but has a results folder reports every cell
    there.
    """
    from ..cell import cell_id
    from ..grid import find_grid, shipped_grids
    from ..registry import did_you_mean
    from ..report import ReportError, write_report

    path = find_grid(grid)
    looks_like_path = grid is not None and (Path(grid).suffix in (".yaml", ".yml") or "/" in grid)
    g = load(grid) if path.is_file() or looks_like_path else None
    name = g.name if g else grid
    store = open_store(results_dir(results, name), set_aside=False)
    if g is None and not (store.root / "cells").is_dir():
        shipped = sorted(shipped_grids())
        fail(f"{grid}: unknown grid: no such file, no experiments/{grid}.yaml and no results/{grid}/"
             f"{did_you_mean(grid, shipped)}; shipped grids: {', '.join(shipped)}")
    if not (store.root / "cells").is_dir():
        how = f"ablate run {grid}" if grid else "ablate run"
        fail(f"{store.root}: no results here (run `{how}` first, or pass --results DIR)")
    try:
        md = write_report(store, Path(out) if out is not None else Path("reports") / name, name=name,
                          description=g.description if g else "",
                          cell_ids={cell_id(c) for c in g.cells} if g else None, progress=progress)
    except ReportError as e:
        fail(str(e))
    except OSError as e:  # an --out that cannot be written
        fail(f"--out {e.filename or out}: {e.strerror or e}")
    click.echo(f"report: {md} and {md.with_suffix('.html')}")
