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


MAX_IMAGE_SIZE = 1024  # px: beyond this no extractor here sees more, and a set of them may not fit in memory


def from_folder(path: str | Path) -> ImageSource:
    """Every image file directly in ``path`` (sorted by name), as 8-bit RGB; all must be one
    size. Sizes are read from the headers first, so a wrong folder is refused before any
    image is decoded; 16-bit images are scaled to 8 bits, not clipped."""
    import warnings

    from PIL import Image

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    with warnings.catch_warnings():
        # An image whose header claims more pixels than PIL's limit (a decompression bomb) is refused, not decoded.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        sizes = [_open(f, lambda im: im.size) for f in files]
        for f, (w, h) in zip(files, sizes):
            if (w, h) != sizes[0]:
                raise SourceError(f"{f}: {w}x{h}, but {files[0].name} is {sizes[0][0]}x{sizes[0][1]}; "
                                  "resize the images to one size first")
        w, h = sizes[0]
        if max(w, h) > MAX_IMAGE_SIZE:
            raise SourceError(f"{files[0]}: {w}x{h} images; at most {MAX_IMAGE_SIZE} px a side are compared")
        images = [torch.from_numpy(_open(f, _rgb8)).permute(2, 0, 1) for f in files]
    return ImageSource(torch.stack(images), f"{path} {w}x{h} n={len(files)}")


def _open(file: Path, read):
    """``read(image)`` of one image file; a file that is no readable image is one line."""
    from PIL import Image

    try:
        with Image.open(file) as im:
            return read(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SourceError(f"{file}: refused: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise SourceError(f"{file}: not a readable image ({' '.join(str(e).split()) or type(e).__name__})") from None


def _rgb8(im) -> np.ndarray:
    """(H, W, 3) uint8. PIL's own conversion of 16- and 32-bit gray clips at 255 (nearly
    every pixel white): scale their range down instead."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) <= 65535 else float(2**32 - 1)
        a = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB")).copy()


def native_size(name: str) -> int | None:
    """The image size a registered dataset is loaded at by default (its loader's), if it has one."""
    import inspect

    from ..data import DATASETS

    default = inspect.signature(DATASETS.get(name)).parameters.get("image_size")
    value = default.default if default is not None else None
    return value if isinstance(value, int) else None


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
        if samples is not None and samples > len(src):
            raise SourceError(f"{text}: --samples {samples}, but the folder holds {len(src)} images")
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
        src = from_dataset(cfg, samples, seed)
        if samples is not None and samples > len(src):
            raise SourceError(f"{text}: --samples {samples}, but the dataset holds {len(src)} images")
        return src
    from ..registry import did_you_mean

    named = [d for d in DATASETS.names() if d not in NOT_BY_NAME]
    what = f"{text!r}: no dataset {name!r}" if prefixed else f"{text!r} is neither a folder nor a dataset"
    raise SourceError(f"{what}{did_you_mean(name, named)}; datasets: {', '.join(named)}")
