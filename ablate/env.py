"""The environment a measurement ran in, stored with every result."""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

import torch

import ablate

from .device import device_name


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """The ablate checkout's commit (with +dirty for uncommitted changes), or '' if none."""
    here = Path(ablate.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{rev}+dirty" if rev and dirty else rev


def environment(device: torch.device) -> dict:
    return {
        "device_type": device.type,
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "ablate_version": ablate.__version__,
        "git_rev": git_revision(),
        "host": platform.node(),
    }
