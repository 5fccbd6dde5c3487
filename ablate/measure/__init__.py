"""Measurements: registered functions from a grid cell to a flat dict of results.

A measurement is one file in this folder that declares everything about it::

    @dataclass
    class FidSettings:                    # the grid's ``fid:`` section
        samples: int = 5000

    @register_measure("fid", settings=FidSettings, needs=("train",), columns=("fid",))
    def fid(cell, progress: bool = True) -> dict:
        ckpt = cell.needed["train"].workdir / "checkpoint.pt"   # a prerequisite's files
        ...
        return {"fid": 12.3, "fid_samples": cell.settings("fid").samples}

``uses`` names the cell settings that change the result, ``needs`` the measurements it
reads (``cell.needed[name].metrics`` and ``.workdir``), ``columns`` the metrics ``ablate
table`` shows by default. Its result is stored under a key that hashes exactly those
inputs, so a cell that differs only in ``train.lr`` reuses the ``flops`` of its twin and
a grid that adds ``timing`` to ``measure:`` keeps the ``flops`` it already has.

Metric names are one namespace per cell, shared with the settings' columns: prefix them by
the measurement (``fid_samples``, not ``samples``). The runner refuses a metric named like
a setting or like another measurement's metric.

The built-in measurements (flops, timing, train) are imported at the end of this module,
so importing ``ablate.measure`` registers them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..registry import Registry

# The cell settings that identify the model; every measurement depends on these (the layer
# choices after ``data`` were added later: keys hold them only where they are set).
MODEL_KEYS = ("model", "block", "input_size", "in_channels", "num_classes", "learn_sigma",
              "class_dropout_prob", "data", "norm", "mlp", "pos_embed", "qk_norm", "long_skips")
# Table columns that say which cell a row is, before any measurement's columns.
IDENTITY_COLUMNS = ("model", "block", "seed", "status")


@dataclass(frozen=True)
class Measurement:
    name: str
    fn: Callable
    settings: type | None = None  # dataclass of the section named like the measurement
    uses: tuple[str, ...] = MODEL_KEYS  # cell settings that change the result
    needs: tuple[str, ...] = ()  # measurements whose results this one reads
    columns: tuple[str, ...] = ()  # metrics shown by default in tables: numbers, but for text_columns
    doc: str = ""
    # Under torchrun, run on every rank (each doing its share; the leader's result is stored)
    # rather than on rank 0 alone: ablate.torchrun.
    distributed: bool = False
    # ``rank_problem(settings, ranks)``: why its section cannot be measured over ``ranks``
    # processes (a text "<field>: <why>; <what to do>"), or None; asked before a launch runs.
    rank_problem: Callable | None = None
    # Fields of its section renamed after results were stored, old name -> new: the old
    # spelling is still read (with a note), and keys hash the field under its old name.
    renamed: dict = field(default_factory=dict, hash=False)
    text_columns: tuple[str, ...] = ()  # the columns whose values are text (a label)


MEASURES: Registry[Measurement] = Registry("measurement")


def register_measure(name: str, *, settings: type | None = None, uses: tuple[str, ...] = MODEL_KEYS,
                     needs: tuple[str, ...] = (), columns: tuple[str, ...] = (), distributed: bool = False,
                     rank_problem: Callable | None = None, renamed: dict | None = None,
                     text_columns: tuple[str, ...] = ()):
    """Decorator: ``@register_measure("flops", columns=("gflops",))`` on ``fn(cell, progress=True) -> dict``.

    ``distributed=True``: under torchrun every rank calls ``fn`` (it splits its work with
    ``ablate.collective.world()``, and only rank 0's result is stored); otherwise rank 0 alone;
    ``rank_problem(settings, ranks)``: the reason its settings cannot be split over ``ranks``."""

    def add(fn: Callable) -> Callable:
        for other_name, other in MEASURES.items():
            clash = sorted(set(columns) & set(other.columns))
            if clash:
                raise ValueError(f"measurement {name!r}: column {clash[0]!r} is already a column of "
                                 f"{other_name!r}; prefix the metric with the measurement's name")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        MEASURES.register(name, Measurement(name, fn, settings, tuple(uses), tuple(needs), tuple(columns), doc,
                                            distributed, rank_problem, dict(renamed or {}), tuple(text_columns)))
        return fn

    return add


def default_columns() -> list[str]:
    """The columns a table shows when none are asked for: identity, then each measurement's
    columns in registration order, then the error."""
    return [*IDENTITY_COLUMNS, *(c for _, m in MEASURES.items() for c in m.columns), "error"]


# The built-ins register themselves on import; they need the names above.
from . import flops, timing, training  # noqa: E402, F401, I001  (registration order: table column order)
from . import fid  # noqa: E402, F401
