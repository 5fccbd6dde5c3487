"""``ablate ls``: what a grid can name, and the built-in grids."""
from __future__ import annotations

import click

KINDS = ("models", "sizes", "blocks", "datasets", "measurements", "grids")


@click.command(name="ls")
@click.argument("what", required=False, metavar="[WHAT]", type=click.Choice(KINDS))
def ls(what):
    """List what a grid can name (WHAT: models, sizes, blocks, datasets, measurements) and
    the built-in grids (grids) that `ablate run NAME` runs; default: all of them."""
    from tabulate import tabulate

    from ..data import DATASETS
    from ..grid import shipped_grids
    from ..measure import MEASURES
    from ..models import BLOCKS, MODELS, SIZES

    tables = {
        "sizes": (["size", "depth", "hidden_size", "num_heads"],
                  [[n, s.depth, s.hidden_size, s.num_heads] for n, s in SIZES.items()]),
        "models": (["model", "size", "patch_size"], [[n, *v] for n, v in MODELS.items()]),
        "blocks": (["block", "description"], [[n, _doc(c)] for n, c in BLOCKS.items()]),
        "datasets": (["dataset", "description"], [[n, _doc(f)] for n, f in DATASETS.items()]),
        "measurements": (["measurement", "settings section", "needs", "description"],
                         [[n, n if m.settings else "", ", ".join(m.needs), m.doc] for n, m in MEASURES.items()]),
        "grids": (["grid", "description", "file"],
                  [[n, _grid_description(p), str(p)] for n, p in shipped_grids().items()]),
    }
    for name in ([what] if what else KINDS):
        headers, rows = tables[name]
        click.echo(tabulate(rows, headers=headers) + "\n")


def _grid_description(path) -> str:
    import yaml

    try:
        return str(yaml.safe_load(path.read_text(encoding="utf-8")).get("description", ""))
    except Exception:  # noqa: BLE001  -- a listing, not a validation: `ablate validate` says what is wrong
        return ""


def _doc(obj) -> str:
    return " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())
