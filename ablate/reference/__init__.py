"""The DiT paper's published numbers, shipped with the package (see README.md here)."""
from __future__ import annotations

import csv
import functools
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Table 4's setting: ImageNet 256x256 through the SD VAE (32x32x4 latents), 1000 classes,
# learned sigma. Its numbers are for adaLN-Zero only; the paper gives no cost per block.
TABLE4_SETTING = {"input_size": 32, "in_channels": 4, "num_classes": 1000, "learn_sigma": True}
TABLE4_BLOCK = "adaln-zero"
_NUMBERS = ("gflops", "params_m", "fid50k_400k")


@functools.cache
def table4() -> dict[str, dict]:
    """The paper's Table 4 by model name (``DiT-XL/2``): gflops, params_m, fid50k_400k, ..."""
    with open(HERE / "dit_table4_256.csv") as f:
        return {r["model"]: {k: float(v) if k in _NUMBERS else v for k, v in r.items()}
                for r in csv.DictReader(f)}


def paper_row(config: dict) -> dict | None:
    """Table 4's row for a cell, or None where the cell is not one of the paper's configs."""
    if config.get("block") != TABLE4_BLOCK:
        return None
    if any(config.get(k) != v for k, v in TABLE4_SETTING.items()):
        return None
    return table4().get(config.get("model"))
