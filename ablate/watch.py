"""Live curves of one cell while it is measured: TensorBoard event files, a W&B run where the
user has W&B, and the progress file that ``ablate status`` reads.

    results/<grid>/tensorboard/<cell label>/events.out.tfevents.*   # TensorBoard, always
    results/<grid>/wandb/                                            # --log wandb
    results/<grid>/work/<train key>/progress.json                    # the last log window

The training loop calls a ``Watch`` at the start of a run (``start``: fresh, or resumed at
its checkpoint's step), at the end of each log window (``window``) and at each evaluation
(``evaluation``); the ``fid`` measurement calls it at each evaluated step (``quality``).
Rank 0 alone holds one under torchrun. Values are read at the window's end, where the loop
syncs with the device already: nothing here adds a sync per step.

A resumed run continues the same curves: ``start`` rewrites the cell's event files keeping
only the steps up to the checkpoint's (what was logged after it, before a crash, is logged
again by the resumed run), so each step is in the files once, whatever reads them (not only
TensorBoard, which would hide a duplicate, but W&B's sync or a script). W&B's history is
append-only: there the steps between the checkpoint and a crash show twice.

Every file is written under the results folder, in folders that are not symbolic links, in
files created fresh.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .files import fresh_temp, write_atomic

BACKENDS = ("tensorboard", "wandb")  # and "none"
LOG_ENV = "ABLATE_LOG"  # what `ablate run --log` chose; its workers, tasks and ranks inherit it
DEFAULT_LOG = ("tensorboard",)
PROGRESS = "progress.json"
# The hparams dashboard's columns: the last value of these tags beside each cell's settings.
HPARAM_METRICS = ("train/loss", "quality/fid")
# Tags of the quality over steps that the fid measurement logs (all of them again, each time).
QUALITY = "quality/"
_SAFE = re.compile(r"[^A-Za-z0-9 ._=+,-]+")


class WatchUnavailable(RuntimeError):
    """A backend asked for and not installed: its message is one line naming the package."""


def backends(text: str | None = None) -> tuple[str, ...]:
    """``tensorboard,wandb`` (the ``--log`` option, or $ABLATE_LOG) -> the backends; ``none``:
    no event files (the progress file is still written). Raises ValueError (one line)."""
    text = os.environ.get(LOG_ENV, ",".join(DEFAULT_LOG)) if text is None else text
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in (*BACKENDS, "none"):
            from .registry import did_you_mean

            raise ValueError(f"{n!r} is not a log backend{did_you_mean(n, [*BACKENDS, 'none'])}; "
                             f"known: {', '.join(BACKENDS)}, none")
    if "none" in names and len(names) > 1:
        raise ValueError(f"{text!r}: none with another backend")
    return tuple(n for n in names if n != "none")


def check_available(names: tuple[str, ...]) -> None:
    """Raise WatchUnavailable where a backend's package is missing."""
    if "wandb" in names:
        _wandb()


def _wandb():
    try:
        import wandb
    except ImportError:
        raise WatchUnavailable("--log wandb needs the wandb package, which is not installed "
                               "(pip install wandb)") from None
    return wandb


def folder_name(label: str) -> str:
    """A cell label (``DiT-XS/4 adaln-zero seed=0``) as one folder name: each run of other
    characters (a slash) becomes ``_``, and it never starts with a dot."""
    name = " ".join(_SAFE.sub("_", label).split()).strip(" .")
    return name or "cell"


@dataclass(frozen=True)
class Target:
    """Where one cell's live values go, as the runner knows it (the results folder, the cell
    as the grid names it, its settings and measured cost)."""

    results: Path  # the grid's results folder
    label: str  # the cell, by the axes that vary
    run_id: str  # the cell's train key: one TensorBoard folder and one W&B run per trained cell
    group: str  # the grid's name: W&B groups the cells of a grid
    hparams: dict = field(default_factory=dict)  # flat settings, with the cost where measured
    backends: tuple[str, ...] = DEFAULT_LOG
    workdir: Path | None = None  # the measurement's work folder: the progress file

    def logdir(self) -> Path:
        """The cell's TensorBoard folder, made if missing; never through a symbolic link. A
        folder of that label holding another trained cell (two grids sharing a results
        folder) gives this one the label and its key's tail."""
        top = _real_folder(self.results, "tensorboard")
        for name in (folder_name(self.label), f"{folder_name(self.label)} {self.run_id[-6:]}"):
            path = _real_folder(top, name)
            owner = path / ".cell"
            if not owner.exists():
                write_atomic(owner, self.run_id + "\n")
                return path
            if _read(owner).strip() == self.run_id:
                return path
        return path


def _real_folder(parent: Path, name: str) -> Path:
    path = parent / name
    if path.is_symlink():
        raise OSError(f"{path}: a symbolic link; live logs are written only into real folders")
    path.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise OSError(f"{path}: not a folder")
    return path


def _read(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


@contextlib.contextmanager
def watching(target: Target | None) -> Iterator["Watch | None"]:
    """A Watch of ``target`` for the ``with`` block (closed however it ends), or None."""
    if target is None:
        yield None
        return
    watch = Watch(target)
    try:
        yield watch
    finally:
        watch.close()


class Watch:
    """One cell's live logger (rank 0): TensorBoard and W&B as chosen, and the progress file."""

    def __init__(self, target: Target):
        self.target = target
        self.writer = None  # torch.utils.tensorboard.SummaryWriter, once started
        self.run = None  # the W&B run
        self.total: int | None = None

    # ----- the calls of the training loop --------------------------------------------
    def start(self, step: int, total: int) -> None:
        """A training run starts at ``step`` (0, or its checkpoint's): what was logged after
        ``step`` is dropped, and the cell's settings are written as hyperparameters."""
        self.total = total
        self._open(keep=lambda tags, s: s <= step)

    def window(self, entry: dict, optimizer: torch.optim.Optimizer | None = None,
               device: torch.device | None = None) -> None:
        """A log window ended: ``entry`` is the loop's log entry (step, loss, step_ms,
        img_per_s, train_wall_s); the learning rate and the gradient norm of the window's last
        step are read from ``optimizer`` (the one sync, where the loop syncs anyway), the peak
        memory so far from ``device``."""
        step = entry["step"]
        values = {"train/loss": entry["loss"], "train/img_per_s": entry["img_per_s"],
                  "train/step_ms": entry["step_ms"]}
        if optimizer is not None:
            values["train/lr"] = optimizer.param_groups[0]["lr"]
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                # After clipping where train.grad_clip is set: the step's update direction.
                values["train/grad_norm"] = torch.linalg.vector_norm(
                    torch.stack(torch._foreach_norm(grads)).float()).item()
        if device is not None:
            from .step import peak_memory_mb

            values["train/peak_mem_mb"] = peak_memory_mb(device)
        self._scalars(step, values)
        self._progress(entry)

    def evaluation(self, entry: dict, image: Path | None = None) -> None:
        """An evaluation of the EMA during training: its sample grid (the PNG the loop saved)
        and whatever the loop's ``evaluate`` returned, at ``entry["step"]``."""
        step = entry["step"]
        values = {f"eval/{k}": v for k, v in entry.items()
                  if k not in ("step", "train_loss", "train_wall_s") and _number(v)}
        self._scalars(step, values)
        if image is not None and image.is_file():
            self._image(step, "eval/samples", image)

    # ----- the fid measurement ------------------------------------------------------------
    def start_quality(self) -> None:
        """The fid measurement starts: its earlier points (another fid setting, a run cut
        short) are dropped, since it logs every evaluated step again."""
        self._open(keep=lambda tags, s: not any(t.startswith(QUALITY) for t in tags))

    def quality(self, step: int, scores: dict) -> None:
        self._scalars(step, {f"{QUALITY}{k}": v for k, v in scores.items() if k != "step" and _number(v)})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.run is not None:
            self.run.finish()
            self.run = None

    # ----- backends -------------------------------------------------------------------------
    def _open(self, keep) -> None:
        self.close()
        t = self.target
        if "tensorboard" in t.backends:
            from torch.utils.tensorboard import SummaryWriter

            logdir = t.logdir()
            rewrite_events(logdir, keep)
            # A random suffix: the file's name is new, so nothing planted can be written through.
            self.writer = SummaryWriter(str(logdir), flush_secs=30, filename_suffix=f".{os.urandom(4).hex()}")
            self._hparams()
        if "wandb" in t.backends:
            wandb = _wandb()
            folder = _real_folder(t.results, "wandb")
            for var, name in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
                os.environ.setdefault(var, str(folder / name))  # W&B's own logs and staging too, unless set
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ablate"), group=t.group, name=t.label,
                                  id=t.run_id, resume="allow", dir=str(folder.parent), config=t.hparams,
                                  reinit="create_new")
            self.run.define_metric("train_step")
            self.run.define_metric("*", step_metric="train_step")  # fid's points come after the last step

    def _hparams(self) -> None:
        """The cell's settings and cost as the hparams dashboard's row of this run."""
        from torch.utils.tensorboard.summary import hparams

        hp = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in self.target.hparams.items()}
        for summary in hparams(hp, {tag: 0.0 for tag in HPARAM_METRICS}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def _scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)
            self.writer.flush()  # each window is on disk before the checkpoint that follows it
        if self.run is not None and values:
            self.run.log({**values, "train_step": step})

    def _image(self, step: int, tag: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
            picture = Image.open(f).convert("RGB")
            picture.load()
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(picture), step, dataformats="HWC")
            self.writer.flush()
        if self.run is not None:
            self.run.log({tag: self._wandb_image(picture), "train_step": step})

    @staticmethod
    def _wandb_image(picture):
        return _wandb().Image(picture)

    def _progress(self, entry: dict) -> None:
        if self.target.workdir is None:
            return
        rate = 1e3 / entry["step_ms"] if entry["step_ms"] > 0 else None
        write_atomic(self.target.workdir / PROGRESS, json.dumps({
            "step": entry["step"], "steps": self.total, "steps_per_s": rate, "img_per_s": entry["img_per_s"],
            "loss": entry["loss"], "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
        }) + "\n")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------
# Event files
# ---------------------------------------------------------------------------------
def event_files(logdir: Path) -> list[Path]:
    """The folder's TensorBoard event files in the order TensorBoard reads them (by name)."""
    return sorted(p for p in logdir.iterdir() if "tfevents" in p.name and p.is_file() and not p.is_symlink())


def rewrite_events(logdir: Path, keep) -> None:
    """Keep only the events ``keep(tags, step)`` accepts, each (tags, step) once, in one file.

    The kept events are written to a fresh file renamed over the oldest event file, then the
    others are removed: a crash in between leaves some events twice, which the next rewrite
    (the next resume) removes. The writers' own records (file version, hyperparameters,
    written anew at each start) are not kept."""
    files = event_files(logdir)
    if not files:
        return
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    kept, seen = [], set()
    for path in files:
        for record in RawEventFileLoader(str(path)).Load():  # a record cut short by a kill ends the file
            event = event_pb2.Event.FromString(record)
            if not event.HasField("summary"):
                continue
            tags = tuple(v.tag for v in event.summary.value)
            if any(v.metadata.plugin_data.plugin_name == "hparams" for v in event.summary.value):
                continue
            if (tags, event.step) in seen or not keep(tags, event.step):
                continue
            seen.add((tags, event.step))
            kept.append(record)
    tmp = fresh_temp(files[0])
    try:
        with open(tmp, "wb") as f:
            writer = RecordWriter(f)
            header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            writer.write(header.SerializeToString())
            for record in kept:
                writer.write(record)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, files[0])
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    for path in files[1:]:
        os.unlink(path)
