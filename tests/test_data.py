import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from ablate.data import DATASETS, DatasetUnavailable, ImageData, build_dataset, check_dataset_config
from ablate.settings import ConfigError
from ablate.registry import UnknownName

DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def toy(n: int) -> ImageData:
    """Image i is the constant i, label i % 3: a batch says exactly which rows it holds."""
    return ImageData(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) % 3,
                     num_classes=3, name="toy")


def rows(x: torch.Tensor) -> list[int]:
    return x.flatten(1)[:, 0].long().tolist()


# ---------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------
def test_digits_shape_range_and_classes():
    d = build_dataset({"name": "digits", "image_size": 32, "root": None})
    assert d.images.shape == (1797, 1, 32, 32) and d.images.dtype == torch.float32
    assert (len(d), d.channels, d.image_size, d.num_classes, d.name) == (1797, 1, 32, 10, "digits")
    assert d.images.min().item() == -1.0 and d.images.max().item() == 1.0
    assert d.labels.dtype == torch.long
    assert torch.bincount(d.labels).tolist() == DIGIT_COUNTS == np.bincount(load_digits().target).tolist()


def test_digits_native_size_is_the_original_values():
    d = build_dataset({"name": "digits", "image_size": 8})
    expected = torch.from_numpy(load_digits().images).float() / 8 - 1  # 0..16 -> -1..1
    assert torch.equal(d.images[:, 0], expected)
    assert torch.equal(d.labels, torch.from_numpy(load_digits().target))
    # Resizing moves ink around but keeps the mean intensity.
    d32 = build_dataset({"name": "digits", "image_size": 32})
    assert abs(d32.images.mean().item() - d.images.mean().item()) < 0.01


def test_digits_default_size_and_cache():
    a = build_dataset({"name": "digits"})
    b = build_dataset({"name": "digits", "image_size": 32})
    assert a.image_size == 32 and a.images is b.images  # loaded once per process


# ---------------------------------------------------------------------------------
# batches, sample, subset
# ---------------------------------------------------------------------------------
def test_batches_cover_an_epoch_without_repeats_then_reshuffle():
    data = toy(103)
    it = data.batches(10, generator=torch.Generator().manual_seed(0))
    epochs = []
    for _ in range(3):
        epoch = [next(it) for _ in range(10)]  # 103 // 10 full batches; 3 rows dropped
        for x, y in epoch:
            assert x.shape == (10, 1, 1, 1) and torch.equal(y, x.flatten().long() % 3)
        epochs.append([r for x, _ in epoch for r in rows(x)])
    for seen in epochs:
        assert len(set(seen)) == 100 and set(seen) <= set(range(103))
        assert seen != sorted(seen)
    assert epochs[0] != epochs[1] != epochs[2]


def test_batches_are_deterministic_with_a_seeded_generator():
    data = toy(50)

    def first(seed, k=12):
        it = data.batches(8, generator=torch.Generator().manual_seed(seed))
        return [rows(next(it)[0]) for _ in range(k)]

    assert first(1) == first(1)
    assert first(1) != first(2)


def test_batches_of_digits_and_bad_batch_size():
    d = build_dataset({"name": "digits", "image_size": 16})
    x, y = next(d.batches(64, torch.Generator().manual_seed(0), device="cpu"))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert all(0 <= v < 10 for v in y.tolist())
    for bad in (0, 1798, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            d.batches(bad)


def test_sample_and_subset():
    data = toy(40)
    s = data.sample(25, torch.Generator().manual_seed(0))
    assert s.shape == (25, 1, 1, 1) and len(set(rows(s))) == 25
    assert torch.equal(s, data.sample(25, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="n=41"):
        data.sample(41)
    sub = data.subset(12)
    assert len(sub) == 12 and sub.num_classes == 3
    assert rows(sub.images) == sorted(set(rows(sub.images)))  # original order, no repeats
    assert torch.equal(sub.labels, sub.images.flatten().long() % 3)
    assert rows(data.subset(12).images) == rows(sub.images)  # fixed seed
    assert rows(data.subset(12, seed=1).images) != rows(sub.images)


# ---------------------------------------------------------------------------------
# imagefolder
# ---------------------------------------------------------------------------------
def write_png(path, size, color, middle=None):
    """A (w, h) image of ``color``; ``middle`` paints the central square."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = color
    if middle is not None:
        s = min(w, h)
        arr[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2] = middle
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_imagefolder(tmp_path):
    # Wide and tall images with black margins and a white centre: the center crop is all white.
    write_png(tmp_path / "cat" / "a.png", (30, 10), (0, 0, 0), middle=(255, 255, 255))
    write_png(tmp_path / "cat" / "b.png", (10, 30), (0, 0, 0), middle=(255, 255, 255))
    write_png(tmp_path / "dog" / "c.png", (16, 16), (255, 0, 0))
    write_png(tmp_path / "dog" / "d.png", (8, 8), (0, 0, 0))
    write_png(tmp_path / "dog" / "e.png", (20, 20), (255, 255, 255))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")

    d = build_dataset({"name": "imagefolder", "image_size": 8, "root": str(tmp_path)})
    assert d.images.shape == (5, 3, 8, 8) and (d.num_classes, d.channels) == (2, 3)
    assert d.labels.tolist() == [0, 0, 1, 1, 1] and d.classes == ["cat", "dog"]
    assert torch.equal(d.images[0], torch.ones(3, 8, 8)) and torch.equal(d.images[1], torch.ones(3, 8, 8))
    assert d.images[2, :, 0, 0].tolist() == [1.0, -1.0, -1.0]  # red
    assert torch.equal(d.images[3], -torch.ones(3, 8, 8))

    g = build_dataset({"name": "imagefolder", "image_size": 4, "root": tmp_path, "channels": 1})
    assert g.images.shape == (5, 1, 4, 4)
    red_luma = (255 * 299 + 500) // 1000  # PIL's ITU-R 601-2 luma, rounded: 76
    assert g.images[2, 0, 0, 0].item() == pytest.approx(red_luma / 255 * 2 - 1)


def test_imagefolder_bad_options(tmp_path):
    with pytest.raises(ValueError, match="channels=2"):
        build_dataset({"name": "imagefolder", "image_size": 8, "root": str(tmp_path), "channels": 2})
    with pytest.raises(ValueError, match="image_size"):
        build_dataset({"name": "imagefolder", "root": str(tmp_path)})
    with pytest.raises(DatasetUnavailable, match="'root' option"):
        build_dataset({"name": "imagefolder", "image_size": 8, "root": str(tmp_path / "nowhere")})


# ---------------------------------------------------------------------------------
# latents
# ---------------------------------------------------------------------------------
@pytest.fixture
def latent_dir(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((20, 4, 4, 4)).astype(np.float16)
    z[:, 0, 0, 0] = np.arange(20)  # row i is findable by its first value
    np.save(tmp_path / "latents.npy", z)
    np.save(tmp_path / "labels.npy", np.arange(20) % 5)
    return tmp_path, z


def test_latents_are_mapped_and_scaled(latent_dir):
    root, z = latent_dir
    d = build_dataset({"name": "latents", "image_size": 4, "root": str(root)})
    assert isinstance(d.source, np.memmap) and d.mapped and d.source.dtype == np.float16
    assert (len(d), d.channels, d.image_size, d.num_classes) == (20, 4, 4, 5)
    assert d.images.dtype == torch.float32
    assert torch.equal(d.images, torch.from_numpy(z).float() * 0.18215)

    raw = build_dataset({"name": "latents", "root": str(root), "scale": 1.0, "num_classes": 8})
    assert raw.image_size == 4 and raw.num_classes == 8
    x, y = next(raw.batches(6, torch.Generator().manual_seed(0)))
    idx = x[:, 0, 0, 0].long()
    assert len(set(idx.tolist())) == 6 and idx.tolist() != sorted(idx.tolist())
    assert torch.equal(x, torch.from_numpy(z[idx.numpy()]).float()) and torch.equal(y, idx % 5)

    sub = raw.subset(7)
    assert isinstance(sub.source, np.memmap) and len(sub) == 7
    assert torch.equal(sub.labels, sub.images[:, 0, 0, 0].long() % 5)
    assert sorted(rows(sub.sample(7, torch.Generator().manual_seed(0)))) == rows(sub.images)


def test_latents_errors(latent_dir, tmp_path_factory):
    root, _ = latent_dir
    with pytest.raises(ValueError, match="image_size=8"):
        build_dataset({"name": "latents", "image_size": 8, "root": str(root)})
    with pytest.raises(ValueError, match="num_classes=3"):
        build_dataset({"name": "latents", "root": str(root), "num_classes": 3})
    with pytest.raises(ValueError, match="scale: 'x' is not a number"):
        build_dataset({"name": "latents", "root": str(root), "scale": "x"})
    with pytest.raises(DatasetUnavailable, match="latents.npy"):
        build_dataset({"name": "latents", "root": str(tmp_path_factory.mktemp("empty"))})


# ---------------------------------------------------------------------------------
# config errors and downloads
# ---------------------------------------------------------------------------------
def test_unknown_dataset_suggests_a_name():
    with pytest.raises(UnknownName) as e:
        build_dataset({"name": "digts", "image_size": 32})
    assert e.value.suggestion == "digits" and "did you mean 'digits'" in str(e.value)
    assert set(DATASETS.names()) >= {"digits", "mnist", "cifar10", "imagefolder", "latents"}


@pytest.mark.parametrize("cfg, key, message", [
    ({"name": "digits", "imagesize": 32}, "imagesize", r"unknown option of dataset 'digits' \(did you mean 'image_size'\?\)"),
    ({"name": "digits", "image_size": 0}, "image_size", "0 must be > 0"),
    ({"name": "digits", "image_size": -4}, "image_size", "-4 must be > 0"),
    ({"name": "digits", "image_size": "32"}, "image_size", "'32' is not an integer"),
    ({"name": "digits", "image_size": True}, "image_size", "True is not an integer"),
    ({"name": "mnist", "train": "yes"}, "train", "'yes' is not true or false"),
    ({"image_size": 32}, "name", "'name'"),
])
def test_bad_options_name_the_key(cfg, key, message):
    with pytest.raises(ConfigError, match=message) as e:
        check_dataset_config(cfg)
    assert e.value.key == key and "\n" not in str(e.value)


def test_numpy_numbers_are_options_of_their_type():
    cfg = check_dataset_config({"name": "mnist", "image_size": np.int64(16), "train": np.bool_(False)})
    assert cfg["image_size"] == 16 and not cfg["train"]


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_download_without_network_is_unavailable(name, tmp_path, monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetUnavailable) as e:
        build_dataset({"name": name, "root": str(tmp_path / "data")})
    message = str(e.value)
    assert calls, "the real download path was not tried"
    assert "\n" not in message and "'root' option" in message and "no network (test)" in message
    assert str(tmp_path / "data") in message
