"""The ``device`` setting: which values it takes, the torch device it resolves to here, and
what a device-dependent result depends on (the device's type and model).

This module imports torch and the standard library only: cells, launchers and the
collectives all resolve devices through it.
"""
from __future__ import annotations

import functools
import platform
import re
from pathlib import Path

import torch

# The spellings of the setting; cuda:N picks GPU N.
DEVICE_SETTINGS = ("auto", "cpu", "cuda", "cuda:N")
_VALID = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def device_problem(setting) -> str | None:
    """Why ``setting`` is no value of ``device`` (the text after "device: "), or None.

    Checked where a cell is validated: torch accepts more (``meta``, ``cpu:5``, ``xpu``),
    which would run nowhere or silently on the CPU, and rejects some only when the
    device is first made (``cuda:x``)."""
    if isinstance(setting, str) and _VALID.fullmatch(setting):
        return None
    return f"{setting!r} is not {', '.join(DEVICE_SETTINGS[:-1])} or {DEVICE_SETTINGS[-1]}"


def resolve_device(setting: str) -> torch.device:
    """The ``device`` setting as this process sees it: auto is cuda where there is a GPU."""
    problem = device_problem(setting)
    if problem:
        raise ValueError(f"device: {problem}")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


def device_identity(setting: str, threads: int | None = None) -> dict:
    """What a device-dependent result depends on: the resolved device type and model (the
    GPU's name; on a CPU its model and the torch threads the measurement runs with)."""
    d = resolve_device(setting)
    if d.type == "cuda":
        # No GPU here (a login node, or reading a GPU grid's table on a laptop): a key that no
        # GPU result has, so lookups fall back to the keys the cell's runner stored, and a
        # real run fails in one line when it asks for the device.
        name = _device_name(str(d)) if torch.cuda.is_available() else "no CUDA device"
        return {"type": "cuda", "name": name}
    return {"type": d.type, "name": _device_name(d.type), "threads": threads or torch.get_num_threads()}


@functools.lru_cache(maxsize=None)
def _device_name(device: str) -> str:
    return device_name(torch.device(device))


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name
