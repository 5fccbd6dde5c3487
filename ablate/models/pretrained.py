"""The official DiT checkpoints, loaded into ``block="adaln-zero"`` with ``strict=True``.

They are downloaded once into ``checkpoints/`` of the cache root (``ablate.paths``); a
machine without a network gets one clear error saying where to put the file instead.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..paths import cache_root
from .configs import create_model
from .dit import DiT

BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
# name -> (model, latent size): the two checkpoints the paper released (ImageNet, 1000 classes).
OFFICIAL = {
    "DiT-XL-2-256x256.pt": ("DiT-XL/2", 32),
    "DiT-XL-2-512x512.pt": ("DiT-XL/2", 64),
}


class CheckpointUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    return cache_root() / "checkpoints"


def state_dict_of(checkpoint) -> dict:
    """Official files hold a bare state dict; training checkpoints hold 'ema' and 'model'."""
    if isinstance(checkpoint, dict) and "ema" in checkpoint:
        return checkpoint["ema"]
    if isinstance(checkpoint, dict) and "model" in checkpoint:
        return checkpoint["model"]
    return checkpoint


def download(name: str) -> Path:
    path = cache_dir() / name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(BASE_URL + name, str(path), progress=True)
    except Exception as e:  # noqa: BLE001  -- urllib raises many kinds when offline
        raise CheckpointUnavailable(
            f"could not download {BASE_URL + name} ({type(e).__name__}: {e}); "
            f"place the file at {path} or pass its path") from None
    return path


def load_official(name_or_path: str, map_location="cpu") -> DiT:
    """An official checkpoint (file name from OFFICIAL, or a path to one) as an adaLN-Zero DiT."""
    path = Path(name_or_path)
    name = path.name
    if name not in OFFICIAL:
        raise ValueError(f"unknown official checkpoint {name!r}; known: {', '.join(OFFICIAL)}")
    if not path.exists():
        path = download(name)
    model_name, latent = OFFICIAL[name]
    model = create_model(model_name, block="adaln-zero", input_size=latent)
    state = state_dict_of(torch.load(path, map_location=map_location, weights_only=True))
    model.load_state_dict(state, strict=True)
    return model.eval()
