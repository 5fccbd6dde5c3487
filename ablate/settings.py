"""Validated settings: plain dicts from YAML in, dataclasses out, one clear line on error.

A section of a cell's settings (``timing``, ``train``, ...) is a dataclass; ``parse`` checks
that a mapping has only its fields (did-you-mean otherwise), that each value has the
field's type, and then runs the class's own ``check()``. Every error is a ``ConfigError``
naming the dotted key and the value, so the CLI can print one line and exit 2.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any, Mapping

import numpy as np

from .registry import did_you_mean


class ConfigError(ValueError):
    """A bad setting: ``key`` is the dotted path, the message says what is wrong."""

    def __init__(self, key: str, message: str, file: str | None = None):
        self.key, self.message, self.file = key, message, file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(str(p) for p in (self.file, self.key) if p not in (None, ""))
        return f"{where}: {self.message}" if where else self.message


def type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from YAML, JSON or numpy) has the type ``hint`` names. One checker
    for settings sections and dataset options alike."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(type_ok(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):  # bool is an int to Python, but True is no batch size
        return False
    if hint is int:  # and one that fits in 64 bits: 10**400 steps or pixels is no setting
        return isinstance(value, numbers.Integral) and -2**63 <= value < 2**63
    if hint is float:  # YAML's .nan and .inf are floats, but no learning rate or scale
        try:
            return isinstance(value, numbers.Real) and math.isfinite(value)
        except OverflowError:  # an integer beyond any float
            return False
    return isinstance(value, origin or hint)


def type_name(hint: Any) -> str:
    """``hint`` in words, for 'x is not <type_name>'."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        inner = type_name(typing.get_args(hint)[0])
        plural = {"an integer": "integers", "a number": "numbers", "a string": "strings",
                  "a mapping": "mappings", "true or false": "true/false values"}
        return f"a list of {plural.get(inner, inner)}"
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


def type_error(value: Any, hint: Any) -> str:
    """Why ``value`` fails ``type_ok(value, hint)``, in words."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} is not a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 63 and (
            int in _flat_args(hint) or float in _flat_args(hint)):
        return f"{shown(value, 40)} ({len(str(abs(value)))} digits) is beyond any number a setting can hold"
    return f"{shown(value)} is not {type_name(hint)}"


def shown(value: Any, width: int = 80) -> str:
    """``repr(value)``, cut to ``width`` characters for a one-line error."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more than 4,300 digits
        text = f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= width else text[:width - 3] + "..."


def deep_merge(a: dict, b: dict) -> dict:
    """``b`` over ``a``, recursively for mappings; lists and scalars in ``b`` replace ``a``'s.
    A new mapping: neither input is changed or shared."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def one_line(err: BaseException, *, with_type: bool = False) -> str:
    """An exception as one line of text (white space folded), optionally after its type."""
    text = " ".join(str(err).split())
    if with_type:
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text or type(err).__name__


# A section field added after results were stored: it enters a measurement's key only when
# set to something other than its default (``keyed``), so adding it keeps the key of every
# stored result, which was measured with what the default does.
_ADDED_LATER = "ablate_added_later"


def added_later(default: Any) -> Any:
    """A dataclass field for a setting added to a section after results were stored; its
    default must do what the section did before it existed. Never change that default: the
    field at its default is not in the key, so results measured the old way would be reused
    (to change it, key the field always, which re-measures)."""
    return dataclasses.field(default=default, metadata={_ADDED_LATER: True})


def added_later_fields(cls: type) -> dict[str, Any]:
    """The fields of ``cls`` declared ``added_later``, with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.metadata.get(_ADDED_LATER)}


def keyed(cls: type, section: Mapping | None) -> Mapping | None:
    """``section`` (a resolved section of ``cls``) as a measurement key hashes it: without
    the fields ``added_later`` that are at their default."""
    if section is None:
        return None
    later = added_later_fields(cls)
    return {k: v for k, v in section.items() if k not in later or v != later[k]}


def _coerce_float(value: Any) -> Any:
    # PyYAML reads "1e-4" (no dot) as a string; a user means the number. And 1 means 1.0:
    # the two spellings must hash alike.
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value)
    except (ValueError, OverflowError):  # not a number, or an integer beyond any float
        return value
    return value


def parse(cls: type, value: Any, key: str) -> Any:
    """A dataclass instance of ``cls`` from a mapping, checked field by field."""
    if value is None:
        value = {}
    if dataclasses.is_dataclass(value):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping of settings, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = type_hints(cls)
    kwargs = {}
    for name, v in value.items():
        if name not in fields:
            shown_name = name if str(name).strip() else repr(name)  # an empty name is shown as ''
            raise ConfigError(f"{key}.{shown_name}" if key else shown_name,
                              f"unknown setting{did_you_mean(name, fields)}; known: {', '.join(fields)}")
        hint = hints[name]
        if float in _flat_args(hint):
            v = _coerce_float(v)
        if not type_ok(v, hint):
            shown_name = name if str(name).strip() else repr(name)  # an empty name is shown as ''
            raise ConfigError(f"{key}.{shown_name}" if key else shown_name, type_error(v, hint))
        kwargs[name] = v
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{key}.{e.key}" if key else e.key, e.message) from None
    return obj


@functools.lru_cache(maxsize=None)
def type_hints(obj) -> dict:
    """``typing.get_type_hints``, once per class or function: resolving string annotations
    was most of the cost of checking a cell (a minute for a 100,000-cell grid)."""
    return typing.get_type_hints(obj)


def _flat_args(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    """Raise ConfigError for the first named field that is negative (or zero)."""
    for name in names:
        v = getattr(obj, name)
        if v is not None and (v < 0 or (v == 0 and not allow_zero)):
            raise ConfigError(name, f"{v!r} must be {'>= 0' if allow_zero else '> 0'}")


def choice(obj: Any, name: str, choices) -> None:
    v = getattr(obj, name)
    if v not in choices:
        raise ConfigError(name, f"{v!r} is not one of {', '.join(map(str, choices))}{did_you_mean(v, choices)}")
