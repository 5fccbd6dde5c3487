"""Image sources for quality metrics: generated samples, a registered dataset, a folder.

Each becomes an ``ImageSource``: uint8 images (N, C, H, W) in memory, a label for the
result row (``digits train 16x16 n=1797``), and, for a dataset, a cache name under which
its features and statistics are kept (a folder or a set of samples is not cached: its
contents may change under the same name).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class SourceError(ValueError):
    """A source that cannot be read (no images, mixed sizes, unknown name); one line."""


@dataclass
class ImageSource:
    images: torch.Tensor  # uint8 (N, C, H, W)
    label: str  # what the numbers were computed against, for the fid_reference column
    cache_name: str | None = None  # names the data for cached reference statistics; None: not cached

    def __len__(self) -> int:
        return len(self.images)


class UInt8Images(Dataset):
    """A uint8 tensor as the Dataset torch-fidelity reads, one (C, H, W) image per item;
    1-channel images become 3-channel for an extractor that takes RGB."""

    def __init__(self, images: torch.Tensor, channels: int):
        self.images, self.channels = images, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        if x.shape[0] == 1 and self.channels == 3:
            x = x.expand(3, -1, -1)
        elif x.shape[0] == 3 and self.channels == 1:
            x = x.float().mean(0, keepdim=True).round().to(torch.uint8)
        return x


def from_samples(samples: torch.Tensor, label: str = "samples") -> ImageSource:
    """Generated images, float in [-1, 1] (``sample_images``) or already uint8."""
    x = samples if samples.dtype == torch.uint8 else to_uint8(samples)
    return ImageSource(x.cpu(), f"{label} n={len(x)}")


def from_dataset(cfg: dict, n: int | None = None, seed: int = 0) -> ImageSource:
    """A registered dataset (``{"name": "digits", "image_size": 16}``): all its images, or a
    fixed random ``n`` of them (``seed``)."""
    from ..data import build_dataset, check_dataset_config

    cfg = check_dataset_config(cfg)
    data = build_dataset(cfg)
    if data.mapped or data.channels not in (1, 3):
        raise SourceError(f"dataset {cfg['name']!r} holds latents, not images: decode them to compare with images")
    if n is not None and n < len(data):
        data = data.subset(n, seed)
    split = "train" if cfg.get("train", True) else "test"
    s = data.image_size
    options = "".join(f" {k}={v}" for k, v in sorted(cfg.items())
                      if k not in ("name", "image_size", "root", "train") and v is not None)
    label = f"{cfg['name']}{options} {split} {s}x{s} n={len(data)}"
    cache = f"ablate-{cfg['name']}{options.replace(' ', '-').replace('=', '')}-{split}-{s}px-n{len(data)}-seed{seed}"
    return ImageSource(to_uint8(data.images), label, cache)


def from_folder(path: str | Path) -> ImageSource:
    """Every image file directly in ``path`` (sorted by name), as RGB; all must be one size."""
    from PIL import Image

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    images, size = [], None
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))
        if size is None:
            size = a.shape
        elif a.shape != size:
            raise SourceError(f"{f}: {a.shape[1]}x{a.shape[0]}, but {files[0].name} is {size[1]}x{size[0]}; "
                              "resize the images to one size first")
        images.append(torch.from_numpy(a.copy()).permute(2, 0, 1))
    return ImageSource(torch.stack(images), f"{path} {size[1]}x{size[0]} n={len(files)}")


# Datasets that a name alone cannot give as an input of `ablate fid`, and why.
NOT_BY_NAME = {
    "imagefolder": "'imagefolder' is the dataset of a folder of images in a grid file: here give the folder "
                   "itself (ablate fid samples/ path/to/images/)",
    "latents": "'latents' holds VAE latents, not images: FID compares images (decode them first)",
}


DATASET_PREFIX = "dataset:"  # `dataset:digits`: the dataset, even where a folder `digits` is here


def dataset_name(text: str) -> str:
    return text[len(DATASET_PREFIX):] if text.startswith(DATASET_PREFIX) else text


def names_folder(text: str) -> bool:
    """Whether an input of ``ablate fid`` is a folder: one that exists, unless written
    ``dataset:NAME``. A bare dataset name that is also a folder here is refused rather than
    guessed (a downloaded ``mnist/`` would silently stand in for the dataset)."""
    from ..data import DATASETS

    if text.startswith(DATASET_PREFIX) or not Path(text).is_dir():
        return False
    if text in DATASETS and text not in NOT_BY_NAME:
        raise SourceError(f"{text!r} is both a folder here and a dataset: write ./{text} for the folder "
                          f"or {DATASET_PREFIX}{text} for the dataset")
    return True


def open_source(text: str, *, image_size: int | None = None, samples: int | None = None, seed: int = 0) -> ImageSource:
    """A folder if ``text`` is one (``names_folder``), else a registered dataset's name,
    optionally written ``dataset:NAME`` (at ``image_size``, or its default); ``samples``
    keeps a fixed random subset of that many."""
    from ..data import DATASETS

    if names_folder(text):
        src = from_folder(text)
        if samples is not None and samples < len(src):
            keep = torch.randperm(len(src), generator=torch.Generator().manual_seed(seed))[:samples].sort().values
            src = ImageSource(src.images[keep], src.label.rsplit(" n=", 1)[0] + f" n={samples}")
        return src
    prefixed = text.startswith(DATASET_PREFIX)
    if not prefixed and (os.sep in text or "/" in text):  # a path, not a name
        raise SourceError(f"{text!r}: no such folder")
    name = dataset_name(text)
    if name in NOT_BY_NAME:
        raise SourceError(NOT_BY_NAME[name])
    if name in DATASETS:
        cfg = {"name": name} if image_size is None else {"name": name, "image_size": image_size}
        return from_dataset(cfg, samples, seed)
    from ..registry import did_you_mean

    named = [d for d in DATASETS.names() if d not in NOT_BY_NAME]
    what = f"{text!r}: no dataset {name!r}" if prefixed else f"{text!r} is neither a folder nor a dataset"
    raise SourceError(f"{what}{did_you_mean(name, named)}; datasets: {', '.join(named)}")
