"""One cell of a grid: its settings, resolved and validated, its id, the keys of its
measurements, and ``Cell``, what a measurement function receives (the model, the data, the
device, its work folder, its prerequisites' results and folders).

A cell's settings are a flat set of top-level keys (``CellSettings``) plus one section per
measurement that has settings (``timing:``, ``train:``); the id of a cell is a hash of all
of it except the list of measurements, so the same cell has the same id tomorrow.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import build_dataset, check_dataset_config
from .device import DEVICE_SETTINGS, device_identity, device_problem, resolve_device  # noqa: F401  (resolve_device: the CLI's)
from .files import make_folder
from .measure import MEASURES, Measurement
from .models import (DESIGN_CHOICES, SIZES, SWITCHES, Layers, dit_kwargs, layers_problem, model_name,
                     parse_model_name)
from .registry import UnknownName, did_you_mean
from .settings import ConfigError, added_later, added_later_fields, keyed, parse


@dataclass
class CellSettings:
    """The top-level settings of a cell (any of them may be an axis of the grid)."""

    model: str | None = None  # a registered name such as "DiT-S/2" ...
    size: str | None = None  # ... or a size and a patch size
    patch_size: int | None = None
    block: str = "adaln-zero"
    seed: int = 0
    input_size: int | None = None  # default: the dataset's image size
    in_channels: int | None = None  # default: the dataset's channels
    num_classes: int | None = None  # default: the dataset's classes
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    data: dict = field(default_factory=lambda: {"name": "digits", "image_size": 32})
    measure: list[str] = field(default_factory=lambda: ["flops"])
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    threads: int | None = None  # CPU threads; default: torch's default
    # The layers' design choices (ablate.models.layers), DiT's by default.
    norm: str = added_later("layernorm")
    mlp: str = added_later("gelu")
    pos_embed: str = added_later("sincos")
    qk_norm: bool = added_later(False)
    long_skips: bool = added_later(False)

    def check(self) -> None:
        if self.model is not None:
            try:
                size, patch = parse_model_name(self.model)
            except UnknownName as e:
                raise ConfigError("model", str(e)) from None
            for key, given, implied in (("size", self.size, size), ("patch_size", self.patch_size, patch)):
                if given is not None and given != implied:
                    raise ConfigError(key, f"{given!r} contradicts model {self.model!r}")
            self.size, self.patch_size = size, patch
        elif self.size is None or self.patch_size is None:
            raise ConfigError("model", "set model (e.g. DiT-S/2) or both size and patch_size")
        else:
            if self.size not in SIZES:
                raise ConfigError("size", str(UnknownName("model size", self.size, SIZES.names())))
        for key in ("patch_size", "seed", "input_size", "in_channels", "num_classes", "threads"):
            v = getattr(self, key)
            if v is not None and (v < 0 or (v == 0 and key != "seed")):
                raise ConfigError(key, f"{v!r} must be {'>= 0' if key == 'seed' else '> 0'}")
        self.model = model_name(self.size, self.patch_size)
        for key, registry in DESIGN_CHOICES.items():
            if getattr(self, key) not in registry:
                raise ConfigError(key, str(UnknownName(registry.kind, getattr(self, key), registry.names())))
        head_dim = SIZES.get(self.size).hidden_size // SIZES.get(self.size).num_heads
        if self.pos_embed == "rope" and head_dim % 4:
            raise ConfigError("pos_embed", f"rope needs a head dim divisible by 4; {self.model} has {head_dim}")
        problem = layers_problem(self.block, Layers(self.norm, self.mlp, self.pos_embed, self.qk_norm))
        if problem:
            raise ConfigError("block", problem)
        try:
            self.data = check_dataset_config(self.data)
        except UnknownName as e:
            raise ConfigError("data.name", str(e)) from None
        except ConfigError as e:
            raise ConfigError(f"data.{e.key}" if e.key else "data", e.message) from None
        if self.input_size is None:
            self.input_size = self.data.get("image_size")
        if self.input_size is not None and self.input_size % self.patch_size:
            raise ConfigError("patch_size", f"{self.patch_size} does not divide the input size {self.input_size}")
        if not 0 <= self.class_dropout_prob < 1:
            raise ConfigError("class_dropout_prob", f"{self.class_dropout_prob!r} must be in [0, 1)")
        for m in self.measure:
            if m not in MEASURES:
                raise ConfigError("measure", str(UnknownName("measurement", m, MEASURES.names())))
        if not self.measure:
            raise ConfigError("measure", "the list of measurements is empty")
        problem = device_problem(self.device)
        if problem:
            raise ConfigError("device", problem + did_you_mean(self.device, DEVICE_SETTINGS[:-1]))


# Settings a cell derives from others when they are not given: an error about one is the
# other's, where the user wrote only that.
IMPLIED_BY = {"size": "model", "patch_size": "model", "input_size": "data.image_size"}


def section_names() -> list[str]:
    return [name for name, m in MEASURES.items() if m.settings is not None]


def resolve(settings: dict) -> dict:
    """Raw settings of one cell -> the canonical settings: validated, defaults filled in,
    sections only for the measurements listed. Raises ConfigError."""
    sections = section_names()
    top = {k: v for k, v in settings.items() if k not in sections}
    top_fields = [f.name for f in dataclasses.fields(CellSettings)]
    for k in top:
        if k not in top_fields:
            known = top_fields + sections
            raise ConfigError(k if str(k).strip() else repr(k),  # an empty name is shown as ''
                              f"unknown setting{did_you_mean(k, known)}; known: {', '.join(known)}")
    config = dataclasses.asdict(parse(CellSettings, top, ""))
    # Expand measurements' prerequisites (fid needs train) in dependency order.
    ordered: list[str] = []

    def add(name: str) -> None:
        for dep in MEASURES.get(name).needs:
            add(dep)
        if name not in ordered:
            ordered.append(name)

    for name in config["measure"]:
        add(name)
    config["measure"] = ordered
    for name in sections:
        given = _renamed(MEASURES.get(name), settings.get(name), note=True)
        parsed = parse(MEASURES.get(name).settings, given, name)  # checked even when not measured
        if name in ordered:
            config[name] = dataclasses.asdict(parsed)
    return config


_NOTED: set[str] = set()


def _renamed(m: Measurement, section: Any, note: bool = False) -> Any:
    """``section`` as given, with the fields ``m`` renamed under their new names (a note on
    stderr, once per process, for each old spelling met: ``note``)."""
    if not m.renamed or not isinstance(section, dict) or not set(section) & set(m.renamed):
        return section
    out = {}
    for k, v in section.items():
        new = m.renamed.get(k)
        if new is None:
            out[k] = v
            continue
        if new in section:
            raise ConfigError(f"{m.name}.{k}", f"{m.name}.{k} is now {m.name}.{new}, which is set too; keep one")
        if note and f"{m.name}.{k}" not in _NOTED:
            _NOTED.add(f"{m.name}.{k}")
            print(f"note: {m.name}.{k} is now {m.name}.{new}", file=sys.stderr, flush=True)
        out[new] = v
    return out


def _old_names(m: Measurement, section: dict) -> dict:
    """A section as keys hash it: a renamed field under its old name, as results were stored."""
    if not m.renamed:
        return section
    old = {new: old for old, new in m.renamed.items()}
    return {old.get(k, k): v for k, v in section.items()}


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cell_id(config: dict) -> str:
    """Stable id of a cell: a hash of its canonical settings less the measurement list, with
    each measurement section reduced to what differs from its defaults, so that adding a
    measurement with default settings to ``measure:`` keeps the cell's id."""
    ident = {}
    for k, v in keyed(CellSettings, config).items():  # less the model settings added later, at their defaults
        if k == "measure":
            continue
        if k in MEASURES and MEASURES.get(k).settings is not None and isinstance(v, dict):
            defaults = dataclasses.asdict(MEASURES.get(k).settings())
            v = _old_names(MEASURES.get(k), {f: x for f, x in v.items() if defaults.get(f, object()) != x})
            if not v:
                continue
        ident[k] = v
    return _digest(ident)


def measurement_key(config: dict, name: str) -> str:
    """Hash of exactly what a measurement's result depends on (see ``Measurement.uses``):
    those cell settings, its section (a field ``added_later`` only where it is set) and its
    prerequisites' keys.

    For a measurement that uses ``device`` (timing), that is the device the setting resolves
    to here, not the setting as written: ``auto`` on a GPU node and on a CPU node are two
    results, which machines sharing a results folder must not reuse for each other."""
    m = MEASURES.get(name)
    later = added_later_fields(CellSettings)  # keyed only where set: a config from before them lacks them
    inputs = {k: config.get(k) for k in m.uses if k not in later or config.get(k, later[k]) != later[k]}
    if "device" in inputs:
        inputs["device"] = device_identity(config["device"], config.get("threads"))
        if "threads" in inputs and inputs["device"]["type"] == "cpu":
            inputs["threads"] = inputs["device"]["threads"]  # threads: null and 2 on 2 cores are one result
    section = keyed(m.settings, config.get(name)) if m.settings else config.get(name)
    inputs["_section"] = _old_names(m, section) if section is not None else None
    inputs["_needs"] = {dep: measurement_key(config, dep) for dep in m.needs}
    return f"{name}-{_digest(inputs)}"


def device_dependent(name: str) -> bool:
    """Whether a measurement's key names the resolved device (it ``uses`` the device setting)."""
    return "device" in MEASURES.get(name).uses


def label(config: dict) -> str:
    """The cell in a few words: model, block, the layer choices that are not DiT's, seed."""
    later = added_later_fields(CellSettings)
    choices = "".join(f" {k}={str(config[k]).lower()}" for k in later if config.get(k, later[k]) != later[k])
    return f"{config['model']} {config['block']}{choices} seed={config['seed']}"


@dataclass(frozen=True)
class Needed:
    """A prerequisite's result as a measurement sees it."""

    metrics: dict  # what it returned
    workdir: Path  # its work folder (checkpoints, samples)
    record: Path | None = None  # its stored result (removing it has the prerequisite measured again)


class Cell:
    """What a measurement function receives: the cell's settings, device, data, model, this
    measurement's work folder, and ``needed[name]`` for each measurement it needs."""

    def __init__(self, config: dict, workdir: Path, needed: dict[str, Needed] | None = None):
        self.config = config
        self.id = cell_id(config)
        self._workdir = Path(workdir)
        self.needed = needed or {}
        self.watch = None  # where live curves go (ablate.watch.Target), set by the runner on rank 0

    @property
    def workdir(self) -> Path:
        """This measurement's folder for checkpoints and samples, made on first use."""
        return make_folder(self._workdir)  # never through a link planted in the results folder

    def settings(self, measurement: Measurement | str):
        m = MEASURES.get(measurement) if isinstance(measurement, str) else measurement
        return parse(m.settings, _renamed(m, self.config.get(m.name)), m.name)

    @functools.cached_property
    def device(self) -> torch.device:
        return resolve_device(self.config["device"])

    @functools.cached_property
    def dataset(self):
        return build_dataset(self.config["data"])

    @functools.cached_property
    def model_kwargs(self) -> dict:
        """DiT constructor keywords; channels and classes come from the data unless set."""
        c = self.config
        in_channels, num_classes, input_size = c["in_channels"], c["num_classes"], c["input_size"]
        if None in (in_channels, num_classes, input_size):
            ds = self.dataset
            in_channels = in_channels or ds.channels
            num_classes = num_classes or ds.num_classes
            input_size = input_size or ds.image_size
        layers = {k: c[k] for k in (*DESIGN_CHOICES, *SWITCHES) if k != "block" and k in c}  # norm, mlp, ...
        return dit_kwargs(size=c["size"], patch_size=c["patch_size"], block=c["block"], input_size=input_size,
                          in_channels=in_channels, num_classes=num_classes, learn_sigma=c["learn_sigma"],
                          class_dropout_prob=c["class_dropout_prob"], **layers)

    def build_model(self):
        from .models import DiT

        torch.manual_seed(self.config["seed"])
        return DiT(**self.model_kwargs).to(self.device)

