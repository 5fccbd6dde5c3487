"""Where ablate keeps what it can make again: one cache root, ``$ABLATE_CACHE`` (default
``~/.cache/ablate``), under which every cache lives (datasets in ``data/``, compiled kernels
in ``compile/``, trained feature extractors in ``extractors/``, reference statistics in
``fidelity/``, pretrained checkpoints in ``checkpoints/``). Read at each use, so setting
the variable moves all of them, in a test session too."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ABLATE_CACHE"
DEFAULT_CACHE = "~/.cache/ablate"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
