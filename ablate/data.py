"""Datasets for training DiTs: registered loaders that return one in-memory ``ImageData``.

A loader is a function ``loader(image_size, root, **options) -> ImageData`` registered with
``@register_dataset("name")``; its keyword defaults and annotations are the dataset's
options, which ``build_dataset`` checks before calling it. Images live in one tensor
(latents in one memory-mapped array) and ``ImageData.batches`` indexes it directly:
small datasets train faster this way than through DataLoader workers.
"""
from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .paths import cache_root
from .registry import Registry, did_you_mean
from .settings import ConfigError, one_line, type_error, type_hints, type_ok

DATASETS: Registry = Registry("dataset")
register_dataset = DATASETS.register

SD_VAE_SCALE = 0.18215  # the Stable Diffusion VAE's latent scale factor, as DiT's train.py uses


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255], as a PNG of them would hold (what FID scores,
    of samples and of a dataset alike)."""
    return x.float().add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


class DatasetUnavailable(RuntimeError):
    """The data is not on disk and cannot be fetched; ``str()`` is one line saying what to do."""


class ImageData:
    """N labelled images (or latents) of shape (C, H, W) with H == W == ``image_size``.

    ``source`` is either a float32 tensor, already scaled to [-1, 1], or a numpy array
    (a memory map for latents) whose rows are read on demand and multiplied by ``scale``.
    """

    def __init__(self, source: torch.Tensor | np.ndarray, labels: torch.Tensor, *, num_classes: int,
                 name: str, scale: float = 1.0, classes: list[str] | None = None,
                 rows: np.ndarray | None = None):
        if source.ndim != 4 or source.shape[2] != source.shape[3]:
            raise ValueError(f"{name}: images must be (N, C, H, W) with H == W, got {tuple(source.shape)}")
        n = len(rows) if rows is not None else len(source)
        if len(labels) != n:
            raise ValueError(f"{name}: {n} images but {len(labels)} labels")
        self.source = source
        self.labels = labels.long()
        self.num_classes = int(num_classes)
        self.name = name
        self.scale = float(scale)
        self.classes = classes
        self._rows = rows  # which rows of a numpy source this set holds (None: all)

    @property
    def mapped(self) -> bool:
        """True when rows are read from a numpy array (a memory map) per batch."""
        return not isinstance(self.source, torch.Tensor)

    @property
    def channels(self) -> int:
        return int(self.source.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.source.shape[-1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.channels, self.image_size, self.image_size)

    @property
    def images(self) -> torch.Tensor:
        """All images as one float32 tensor; for a memory-mapped source this reads every row."""
        if not self.mapped:
            return self.source
        return self._gather(torch.arange(len(self)))

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self.source)

    def __repr__(self) -> str:
        return (f"ImageData({self.name!r}, n={len(self)}, channels={self.channels}, "
                f"image_size={self.image_size}, num_classes={self.num_classes})")

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` as float32, on the device of ``idx`` for a tensor source, else on the CPU."""
        if not self.mapped:
            return self.source[idx]
        rows = idx.cpu().numpy()
        if self._rows is not None:
            rows = self._rows[rows]
        # A memory map is read fastest in file order; read sorted, then put back in batch order.
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.source.shape[1:]), dtype=self.source.dtype)
        out[order] = self.source[rows[order]]
        x = torch.from_numpy(out).float()
        return x.mul_(self.scale) if self.scale != 1.0 else x

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled (x, y) batches forever: a new permutation each epoch, the last partial batch dropped.

        An in-memory source is copied to ``device`` once, so each step indexes there and
        copies nothing from the host; a memory-mapped source is read a batch at a time.
        """
        n = len(self)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
            raise ValueError(f"batch_size={batch_size!r} must be an integer in [1, {n}] for {self.name}")
        return self._batches(batch_size, generator, torch.device(device))

    def _batches(self, batch_size, generator, device):
        n = len(self)
        perm_device = generator.device if generator is not None else torch.device("cpu")
        if self.mapped:
            labels = self.labels
        else:
            source, labels = self.source.to(device), self.labels.to(device)
        while True:
            perm = torch.randperm(n, generator=generator, device=perm_device)
            perm = perm.cpu() if self.mapped else perm.to(device)
            for start in range(0, n - batch_size + 1, batch_size):
                idx = perm[start:start + batch_size]
                if self.mapped:
                    yield self._gather(idx).to(device), labels[idx].to(device)
                else:
                    yield source[idx], labels[idx]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` distinct random images, float32 on the CPU (real images for FID references)."""
        idx = self._random_rows(n, generator)
        return self._gather(idx).cpu()

    def subset(self, n: int, seed: int = 0) -> ImageData:
        """A fixed random ``n`` of the images, in their original order (a memory map stays one)."""
        idx = self._random_rows(n, torch.Generator().manual_seed(seed)).sort().values
        if self.mapped:
            rows = self._rows[idx.numpy()] if self._rows is not None else idx.numpy()
            return ImageData(self.source, self.labels[idx], num_classes=self.num_classes, name=self.name,
                             scale=self.scale, classes=self.classes, rows=rows)
        return ImageData(self.source[idx], self.labels[idx], num_classes=self.num_classes,
                         name=self.name, classes=self.classes)

    def _random_rows(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(self):
            raise ValueError(f"n={n!r} must be an integer in [0, {len(self)}] for {self.name}")
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randperm(len(self), generator=generator, device=device)[:n].cpu()


# ---------------------------------------------------------------------------------
# Building from a config
# ---------------------------------------------------------------------------------
def build_dataset(cfg: Mapping) -> ImageData:
    """``{"name": "digits", "image_size": 32, ...options}`` -> ImageData, options checked first."""
    options = check_dataset_config(cfg)
    return DATASETS.get(options.pop("name"))(**options)


def check_dataset_config(cfg: Mapping) -> dict:
    """Validate a dataset config without loading anything; returns it with the loader's
    defaults filled in (so that two spellings of the same dataset hash alike). Raises
    ConfigError at the option's key (``image_size``), or UnknownName for the dataset's name."""
    if not isinstance(cfg, Mapping) or "name" not in cfg:
        raise ConfigError("name", f"a dataset config needs a 'name' (one of: {', '.join(DATASETS.names())}), "
                          f"got {cfg!r}")
    options = dict(cfg)
    name = options.pop("name")
    loader = DATASETS.get(name)
    _check_options(name, loader, options)
    defaults = {k: p.default for k, p in inspect.signature(loader).parameters.items()
                if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}
    return {"name": name, **defaults, **options}


def _check_options(name: str, loader, options: dict) -> None:
    params = inspect.signature(loader).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    hints = type_hints(loader)
    for key, value in options.items():
        if key not in named:
            if takes_any:
                continue
            raise ConfigError(key, f"unknown option of dataset {name!r}{did_you_mean(key, named)}; "
                              f"options: {', '.join(named)}")
        if key in hints and not type_ok(value, hints[key]):
            raise ConfigError(key, type_error(value, hints[key]))
    missing = [k for k in named if params[k].default is inspect.Parameter.empty and k not in options]
    if missing:
        raise ConfigError(missing[0], f"dataset {name!r} needs this option (required: {', '.join(missing)})")
    size = options.get("image_size")
    if size is not None and size <= 0:
        raise ConfigError("image_size", f"{size!r} must be > 0")


# ---------------------------------------------------------------------------------
# Helpers for loaders
# ---------------------------------------------------------------------------------
def _resize(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """(N, C, h, w) in [0, 1] -> (N, C, size, size), bilinear with antialiasing when shrinking."""
    if x.shape[-2:] == (size, size):
        return x
    out = x.new_empty((x.shape[0], x.shape[1], size, size))
    for i in range(0, len(x), chunk):  # bounds the interpolation's temporary memory
        out[i:i + chunk] = F.interpolate(x[i:i + chunk], size=(size, size), mode="bilinear",
                                         antialias=True, align_corners=False)
    return out


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]; the clamp removes interpolation rounding past the ends."""
    return x.mul_(2).sub_(1).clamp_(-1, 1)


def _data_root(root: str | os.PathLike | None) -> Path:
    return Path(root).expanduser() if root is not None else cache_root() / "data"


# ---------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    return _to_unit_range(_resize(x, image_size)), torch.from_numpy(d.target).long()


@register_dataset("digits")
def digits(image_size: int = 32, root: str | os.PathLike | None = None) -> ImageData:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes); no download.

    The tensor is cached per image size and shared between calls: treat it as read-only.
    """
    x, y = _digits(image_size)
    return ImageData(x, y, num_classes=10, name="digits", classes=[str(i) for i in range(10)])


# Where torchvision looks for each dataset under root, for the message when it is missing.
_TORCHVISION_FILES = {
    "MNIST": "MNIST/raw/ (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*)",
    "CIFAR10": "cifar-10-batches-py/ (cifar-10-python.tar.gz extracted)",
}


def _torchvision_dataset(cls_name: str, name: str, root, train: bool):
    import torchvision.datasets

    cls = getattr(torchvision.datasets, cls_name)
    path = _data_root(root)
    try:
        return cls(str(path), train=train, download=False)
    except RuntimeError:  # not there (or corrupted): download
        pass
    try:
        return cls(str(path), train=train, download=True)
    except (OSError, RuntimeError, HTTPException) as e:
        raise DatasetUnavailable(
            f"{name}: not found under {path} and the download failed ({one_line(e)}); "
            f"place {_TORCHVISION_FILES[cls_name]} under that folder, or set the 'root' option "
            f"to a folder that holds them") from None


@register_dataset("mnist")
def mnist(image_size: int = 28, root: str | os.PathLike | None = None, *, train: bool = True) -> ImageData:
    """MNIST via torchvision (downloaded into ``root``, default $ABLATE_CACHE/data)."""
    ds = _torchvision_dataset("MNIST", "mnist", root, train)
    x = ds.data.unsqueeze(1).float().div_(255)  # (N, 1, 28, 28)
    return ImageData(_to_unit_range(_resize(x, image_size)), ds.targets, num_classes=10,
                     name="mnist", classes=list(ds.classes))


@register_dataset("cifar10")
def cifar10(image_size: int = 32, root: str | os.PathLike | None = None, *, train: bool = True) -> ImageData:
    """CIFAR-10 via torchvision (downloaded into ``root``, default $ABLATE_CACHE/data)."""
    ds = _torchvision_dataset("CIFAR10", "cifar10", root, train)
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255)  # (N, 3, 32, 32)
    return ImageData(_to_unit_range(_resize(x.contiguous(), image_size)), torch.tensor(ds.targets),
                     num_classes=10, name="cifar10", classes=list(ds.classes))


def _load_center_square(path: str, image_size: int, mode: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert(mode)
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        # Crop before resizing: resize(box=...) would let the filter reach past the square.
        # PIL's bicubic filter widens when shrinking, so this antialiases.
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return np.asarray(im)


@register_dataset("imagefolder")
def imagefolder(image_size: int, root: str | os.PathLike | None = None, *, channels: int = 3) -> ImageData:
    """A folder with one subfolder of images per class (classes sorted by name), center-cropped."""
    from torchvision.datasets import ImageFolder

    if root is None:
        raise ValueError("dataset 'imagefolder': option root=None must be a folder of class subfolders")
    if channels not in (1, 3):
        raise ValueError(f"dataset 'imagefolder': option channels={channels!r} must be 1 or 3")
    path = Path(root).expanduser()
    try:
        folder = ImageFolder(str(path))
    except (FileNotFoundError, NotADirectoryError) as e:
        raise DatasetUnavailable(
            f"imagefolder: no images under root={str(path)!r} ({one_line(e)}); "
            f"set the 'root' option to a folder with one subfolder of images per class") from None
    paths = [p for p, _ in folder.samples]
    mode = "L" if channels == 1 else "RGB"
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        arrays = list(pool.map(lambda p: _load_center_square(p, image_size, mode), paths))
    x = torch.from_numpy(np.stack(arrays)).reshape(len(paths), image_size, image_size, channels)
    x = x.permute(0, 3, 1, 2).float().div_(255)  # (N, C, H, W)
    return ImageData(_to_unit_range(x.contiguous()), torch.tensor(folder.targets),
                     num_classes=len(folder.classes), name="imagefolder", classes=list(folder.classes))


@register_dataset("latents")
def latents(image_size: int | None = None, root: str | os.PathLike | None = None, *,
            scale: float = SD_VAE_SCALE, num_classes: int | None = None) -> ImageData:
    """Pre-extracted VAE latents: ``root``/latents.npy (N, C, H, W) and ``root``/labels.npy (N,).

    The latents stay memory-mapped and are read a batch at a time, times ``scale``. The
    default scale assumes latents saved as the VAE returns them; latents saved already
    scaled (fast-DiT's extract_features.py multiplies by 0.18215 before saving) need
    ``scale=1.0``. ``image_size`` is the latent side (image side / 8 for the SD VAE).
    """
    if root is None:
        raise ValueError("dataset 'latents': option root=None must be a folder with latents.npy "
                         "and labels.npy")
    path = Path(root).expanduser()
    files = {f: path / f for f in ("latents.npy", "labels.npy")}
    missing = [f for f, p in files.items() if not p.is_file()]
    if missing:
        raise DatasetUnavailable(f"latents: no {' or '.join(missing)} in root={str(path)!r}; set the 'root' "
                                 f"option to a folder with latents.npy (N, C, H, W) and labels.npy (N,)")
    x = np.load(files["latents.npy"], mmap_mode="r")
    y = np.load(files["labels.npy"])
    if x.ndim != 4 or x.shape[2] != x.shape[3] or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"latents: latents.npy must be float (N, C, H, W) with H == W, "
                         f"got {x.dtype} {tuple(x.shape)}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"latents: labels.npy must be integer ({len(x)},), got {y.dtype} {tuple(y.shape)}")
    if image_size is not None and image_size != x.shape[-1]:
        raise ValueError(f"dataset 'latents': option image_size={image_size!r} but the latents are "
                         f"{x.shape[2]}x{x.shape[3]} (image_size is the latent side)")
    if num_classes is None:
        num_classes = int(y.max()) + 1 if len(y) else 0
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"dataset 'latents': option num_classes={num_classes!r} but labels.npy holds "
                         f"labels {int(y.min())}..{int(y.max())}")
    return ImageData(x, torch.from_numpy(y.astype(np.int64)), num_classes=num_classes,
                     name="latents", scale=scale)
