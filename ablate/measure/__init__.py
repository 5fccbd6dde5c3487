"""Measurements: registered functions from a run to a flat dict of results.

A measurement declares the settings section it reads (a dataclass, parsed from the grid
under the measurement's own name, e.g. ``timing:``), the run settings it depends on, and
the measurements it needs first. Its result is stored under a key that hashes exactly
those inputs, so a cell that differs only in ``train.lr`` reuses the ``flops`` of its twin
and a grid that adds ``timing`` to ``measure:`` keeps the ``flops`` it already has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import Registry

# The run settings that identify the model; every measurement depends on these.
MODEL_KEYS = ("model", "block", "input_size", "in_channels", "num_classes", "learn_sigma",
              "class_dropout_prob", "data")


@dataclass(frozen=True)
class Measurement:
    name: str
    fn: Callable
    settings: type | None = None  # dataclass of the section named like the measurement
    uses: tuple[str, ...] = MODEL_KEYS  # run settings that change the result
    needs: tuple[str, ...] = ()  # measurements whose results this one reads
    doc: str = ""


MEASURES: Registry[Measurement] = Registry("measurement")


def register_measure(name: str, *, settings: type | None = None, uses: tuple[str, ...] = MODEL_KEYS,
                     needs: tuple[str, ...] = ()):
    """Decorator: ``@register_measure("flops")`` on ``fn(run) -> dict``."""

    def add(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        MEASURES.register(name, Measurement(name, fn, settings, tuple(uses), tuple(needs), doc))
        return fn

    return add


def load_builtin() -> None:
    """Import the modules whose import registers the built-in measurements."""
    from . import flops, timing, training  # noqa: F401
