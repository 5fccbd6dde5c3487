"""``ablate status``: what each cell of a grid is doing now, read from its results folder."""
from __future__ import annotations

import sys
import time

import click

from .common import folder_option, load, open_store, results_dir


@click.command()
@click.argument("grid", required=False)
@click.option("--results", metavar="DIR", callback=folder_option, help="Results folder (default: results/<grid name>).")
@click.option("--watch", "every", type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="Show it again every SECONDS, until Ctrl-C.")
def status(grid, results, every):
    """What each cell of GRID (default: quick) is doing now: done, running (which process
    holds it: host, pid, since when; its training step, rate and time left), failed or
    pending. Reads the results folder only, so it runs from any machine that sees it (a
    login node) and starts and writes nothing."""
    from ..status import grid_status, render

    g = load(grid)
    store = open_store(results_dir(results, g.name), set_aside=False)
    try:
        while True:
            text = render(grid_status(g, store), store.root)
            if every and sys.stdout.isatty():
                click.clear()
            click.echo(text)
            if not every:
                return
            time.sleep(every)
            click.echo()
    except KeyboardInterrupt:  # the way out of --watch
        return
