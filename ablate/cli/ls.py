"""``ablate ls``: what a grid can name, and the built-in grids."""
from __future__ import annotations

import click

KINDS = ("models", "sizes", "blocks", "choices", "datasets", "measurements", "settings", "grids")


@click.command(name="ls")
@click.argument("what", required=False, metavar="[WHAT]", type=click.Choice(KINDS))
def ls(what):
    """List what a grid can name (WHAT: models, sizes, blocks, choices: the other design
    axes and their values, datasets, measurements, settings: every field of each
    measurement's section with its default) and the built-in grids (grids) that
    `ablate run NAME` runs; default: all of them."""
    from tabulate import tabulate

    from ..data import DATASETS
    from ..grid import shipped_grids
    from ..measure import MEASURES
    from ..models import BLOCKS, MODELS, SIZES, design_choices

    tables = {
        "sizes": (["size", "depth", "hidden_size", "num_heads"],
                  [[n, s.depth, s.hidden_size, s.num_heads] for n, s in SIZES.items()]),
        "models": (["model", "size", "patch_size"], [[n, *v] for n, v in MODELS.items()]),
        "blocks": (["block", "description"], [[n, _doc(c)] for n, c in BLOCKS.items()]),
        "choices": (["setting", "value", "description"], [list(r) for r in design_choices()]),
        "datasets": (["dataset", "description"], [[n, _doc(f)] for n, f in DATASETS.items()]),
        "measurements": (["measurement", "settings section", "needs", "description"],
                         [[n, n if m.settings else "", ", ".join(m.needs), m.doc] for n, m in MEASURES.items()]),
        "settings": (["setting", "default"], _section_fields(MEASURES)),
        "grids": (["grid", "description", "file"],
                  [[n, _grid_description(p), str(p)] for n, p in shipped_grids().items()]),
    }
    for name in ([what] if what else KINDS):
        headers, rows = tables[name]
        click.echo(tabulate(rows, headers=headers) + "\n")


def _section_fields(measures) -> list[list[str]]:
    """``section.field`` and its default, for each measurement that has a settings section."""
    import dataclasses

    rows = []
    for name, m in measures.items():
        if m.settings is None:
            continue
        for f in dataclasses.fields(m.settings):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            rows.append([f"{name}.{f.name}", "null" if default is None else str(default)])
    return rows


def _grid_description(path) -> str:
    import yaml

    try:
        return str(yaml.safe_load(path.read_text(encoding="utf-8")).get("description", ""))
    except Exception:  # noqa: BLE001  -- a listing, not a validation: `ablate validate` says what is wrong
        return ""


def _doc(obj) -> str:
    """The first paragraph of a docstring, on one line, without reST's double backticks."""
    return " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "")
