"""``ablate validate``: check grid files without running them."""
from __future__ import annotations

import os
import pickle
import sys

import click

from ..settings import ConfigError
from .common import load_or_raise


@click.command()
@click.argument("grids", nargs=-1, required=True)
def validate(grids):
    """Check grid files without running them: one line per file; exit 2 if any is wrong."""
    bad = False
    for grid in grids:
        ok, line = _check(grid)
        click.echo(line, err=not ok)
        bad = bad or not ok
    if bad:
        sys.exit(2)


def _check(grid: str) -> tuple[bool, str]:
    """(ok, the line to show) for one grid file, checked in a child process where the system
    allows: a plugin the grid imports may end the process itself (``os._exit``), which no
    handler in this one can see, and each file's plugins are then imported afresh."""
    if not hasattr(os, "fork"):
        return _verdict(grid)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: check, send the verdict, and leave without running the parent's exit code
        os.close(read)
        try:
            verdict = _verdict(grid)
        except BaseException as e:  # noqa: BLE001  -- anything at all becomes the file's one line
            verdict = (False, f"error: {grid}: {type(e).__name__} while loading it: {e}")
        with os.fdopen(write, "wb") as f:
            pickle.dump(verdict, f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if data:
        return pickle.loads(data)
    code = os.waitstatus_to_exitcode(status)
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return False, f"error: {grid}: the process {how} while loading it (a plugin it imports ends the process?)"


def _verdict(grid: str) -> tuple[bool, str]:
    try:
        g = load_or_raise(grid)
    except ConfigError as e:
        return False, f"error: {e}"
    except KeyboardInterrupt:
        return False, f"error: {grid}: KeyboardInterrupt while loading it"
    return True, (f"{grid}: ok, {len(g.cells)} cells, axes: {', '.join(g.axes) or 'none'}; "
                  f"measure: {', '.join(g.cells[0]['measure'])}")
