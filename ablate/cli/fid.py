"""``ablate fid``: FID, KID and precision/recall between two folders of images or datasets."""
from __future__ import annotations

import click

from ..settings import ConfigError, one_line
from .common import FORMATS, fail, print_table

# A domain extractor is trained at the images' size: far from the size its dataset is made
# at, it trains for hours on what is likely a mosaic of samples, not single images.
SIZE_RATIO_LIMIT = 4


@click.command(name="fid")
@click.argument("input1")
@click.argument("input2")
@click.option("--extractor", "-e", default="auto", show_default=True, metavar="NAME",
              help="inception (standard FID), domain (a CNN trained on the dataset), or auto: domain for "
                   "digits and mnist, else inception.")
@click.option("--samples", "-n", type=int, metavar="N", help="Use a fixed random N images of each input.")
@click.option("--image-size", type=click.IntRange(min=1), metavar="PX",
              help="Size of a dataset input (default: the other input's, if a folder, else the dataset's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per batch for features.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--format", "-f", "fmt", type=click.Choice(FORMATS[:3]), default="markdown", show_default=True)
def fid_command(input1, input2, extractor, samples, image_size, batch_size, device, fmt):
    """FID, KID and precision/recall between INPUT1 (e.g. generated samples) and INPUT2 (the
    reference), each a folder of images or a dataset name (digits, mnist, ...; dataset:mnist
    where a folder here has that name too). Offline.

    \b
      ablate fid samples/ digits                      # a folder of samples against the digits
      ablate fid a/ b/ --extractor inception -f json  # the standard Inception FID of two folders
    """
    import pandas as pd
    import torch

    from ..data import DatasetUnavailable
    from ..quality.extractors import EXTRACTORS, ExtractorUnavailable, default_extractor, get_extractor
    from ..quality.metrics import quality
    from ..quality.sources import MAX_IMAGE_SIZE, SourceError, dataset_name, names_folder, open_source
    from ..registry import UnknownName

    if samples is not None and samples < 2:
        fail(f"--samples: {samples} must be >= 2 (FID needs a covariance)")
    if image_size is not None and image_size > MAX_IMAGE_SIZE:
        fail(f"--image-size: {image_size} px; at most {MAX_IMAGE_SIZE} px a side are compared")
    device = _device(device)
    try:
        # A dataset compared with a folder is taken at the folder's image size unless told otherwise.
        # Different seeds: a dataset against itself compares two random subsets, not one twice.
        first, second = (open_source(x, samples=samples, seed=i) if names_folder(x) else None
                         for i, x in enumerate((input1, input2)))
        for src in (first, second):
            if src is not None and len(src) < 2:
                raise SourceError(f"{src.label}: FID needs at least 2 images (a covariance)")
        size = image_size or next((s.images.shape[-1] for s in (first, second) if s is not None), None)
        dataset = next((dataset_name(x) for x in (input2, input1) if not names_folder(x)), None)
        name = default_extractor(dataset) if extractor == "auto" else extractor
        EXTRACTORS.get(name)  # an unknown name is said before any image is read
        if dataset is not None and name == "domain" and size is not None:
            _check_domain_size(dataset, size, image_size is not None)
        first = first or open_source(input1, image_size=size, samples=samples, seed=0)
        second = second or open_source(input2, image_size=size, samples=samples, seed=1)
        if first.images.shape == second.images.shape and torch.equal(first.images, second.images):
            raise SourceError(f"{input1} and {input2} are the same {len(first)} images: their FID is 0 by "
                              "construction (-n N compares two random subsets)")
        cfg = None
        if dataset is not None:
            cfg = {"name": dataset, **({"image_size": size} if size else {})}
        ext = get_extractor(name, cfg, progress=True)
        scores = quality(first, second, ext, batch_size=batch_size, device=device)
    except (SourceError, ExtractorUnavailable, DatasetUnavailable, UnknownName, ConfigError, ValueError,
            OSError) as e:
        fail(one_line(e))
    row = {"input1": first.label, "input2": second.label, **scores, "fid_extractor": ext.label}
    print_table(pd.DataFrame([row]), list(row), fmt)


def _device(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N of a GPU this machine has; anything else (meta,
    cpu:5, cudafoo) refused rather than replaced by the CPU or failed on later."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        fail(f"--device: {text!r} is not auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            fail(f"--device: {text!r}: no CUDA device on this machine")
        if dev.index is not None and dev.index >= count:
            fail(f"--device: {text!r}: this machine has {count} CUDA device{'s' * (count > 1)} (cuda:0 to "
                 f"cuda:{count - 1})")
    return text


def _check_domain_size(dataset: str, size: int, given: bool) -> None:
    """Refuse a domain extractor at a size far from its dataset's (it would be trained at that size)."""
    from ..quality.sources import native_size

    native = native_size(dataset)
    if native is None or native / SIZE_RATIO_LIMIT <= size <= native * SIZE_RATIO_LIMIT:
        return
    where = "--image-size" if given else f"the folder's images are {size}x{size}"
    fail(f"{where}, but {dataset} is made at {native}x{native}: a domain extractor would be trained at "
         f"{size} px (for hours, and on what may be a mosaic of samples rather than single images); "
         f"compare single images near {native} px, or use --extractor inception")
