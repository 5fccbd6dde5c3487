"""The ``ablate`` command: run a grid, query its table, score images, validate grid files,
write a report, list registries. One module per command; ``common`` holds what they share.

A mistake in the input is one line on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import click

from .common import OneLineErrors
from .fid import fid_command
from .ls import ls
from .report import report
from .run import run
from .status import status
from .table import table
from .validate import validate


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ablate")
def main():
    """Measure what a Diffusion Transformer design choice costs and what it buys.

    \b
    A grid file (YAML) names the cells: model sizes x patch sizes x conditioning blocks
    (adaln-zero, adaln, cross-attn, in-context) x seeds x any setting; each cell is measured
    (flops, timing, train, fid) and becomes one row of a results table.

    \b
    Start here:
      ablate run                  # the shipped quick grid: 4 blocks on digits, a few minutes on a CPU
      ablate status               # what each cell is doing now (another terminal)
      ablate table                # its results
      ablate report               # its figures and tables, in reports/quick/
      ablate ls                   # models, blocks, datasets, measurements you can name
      ablate ls grids             # the built-in grids
      ablate run dit-paper-gflops # the paper's 48 Gflops cells
    """


for command in (run, status, table, fid_command, validate, report, ls):
    main.add_command(command)

__all__ = ["main"]
