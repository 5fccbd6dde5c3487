"""The files a training run leaves in its work folder, and how they are read back.

``checkpoint.pt`` holds everything a run resumes from exactly: the weights, the EMA, the
optimizer, every RNG state, the data order and the log. ``ema_step{N:07d}.pt`` holds the
EMA alone at an earlier step (``train.ema_snapshots``). Both are written whole (a temporary
file renamed into place); a checkpoint that cannot be read back as one, its file damaged or
its content not a checkpoint's, is set aside as ``*.corrupt`` and training starts over.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

import torch

from .files import replace_with, set_aside
from .settings import one_line

CHECKPOINT = "checkpoint.pt"
EMA_SNAPSHOT = "ema_step{step:07d}.pt"  # the final step's EMA is the checkpoint's


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a fresh temporary file and rename it over ``path``: a crash or a full disk
    mid-write leaves the previous checkpoint intact and no temporary file behind (a kill -9
    leaves one, which the next run removes: ``files.remove_stale_temps``)."""
    def write(tmp) -> None:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:
            # torch's zip writer reports a failed write as "[enforce fail at inline_container.cc]
            # ... file write failed" or "unexpected pos", whatever the cause: name a full disk.
            free = shutil.disk_usage(Path(path).parent).free
            if free < _nbytes(state) + 2**20:
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free / 2**20:.0f} MB free, the "
                                            f"checkpoint needs {_nbytes(state) / 2**20:.0f} MB)", str(path)) from e
            raise

    replace_with(path, write)


def _nbytes(obj) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists): about a checkpoint's size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# What a checkpoint holds, key -> type (``checkpoint_problem``); "precision" is optional
# (checkpoints written before it resume in the precision their settings resolve to).
SCHEMA = {"step": int, "seed": int, "batch_size": int, "settings": dict, "model": dict, "ema": dict,
          "optimizer": dict, "rng": dict, "data": dict, "window": dict, "log": list, "evals": list,
          "train_wall_s": float}
_PARTS = {"rng": {"torch": torch.Tensor}, "data": {"epoch_rng": torch.Tensor, "in_epoch": int},
          "window": {"loss_sum": torch.Tensor, "steps": int}, "optimizer": {"state": dict, "param_groups": list}}


def _is(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def checkpoint_problem(ck, weights: dict | None = None) -> str | None:
    """Why ``ck`` (what ``load_checkpoint`` returned) is not a checkpoint this run can resume
    from, or None. ``weights``: the model's state dict; the checkpoint's weights and EMA
    must have its names and shapes."""
    if not isinstance(ck, dict):
        return f"holds a {type(ck).__name__}, not a checkpoint's mapping"
    for key, kind in SCHEMA.items():
        if key not in ck:
            return f"has no {key!r}"
        if not _is(ck[key], kind):
            return f"{key!r} is {type(ck[key]).__name__} {str(ck[key])[:40]!r}, not {kind.__name__}"
    for key, parts in _PARTS.items():
        for part, kind in parts.items():
            if not _is(ck[key].get(part), kind):
                return f"{key}.{part!r} is missing or not {kind.__name__}"
    if "precision" in ck and not isinstance(ck["precision"], str):
        return f"'precision' is {ck['precision']!r}, not a name"
    if weights is not None:
        want = {k: tuple(v.shape) for k, v in weights.items()}
        for key in ("model", "ema"):
            have = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in ck[key].items()}
            if have != want:
                diff = sorted(set(have) ^ set(want)) or sorted(k for k in want if have[k] != want[k])
                return f"{key!r} is not this model's weights (first difference: {diff[0]!r})"
    return None


def load_or_set_aside(path: Path, move: bool = True, weights: dict | None = None) -> dict | None:
    """The checkpoint, or None if there is none or it cannot be resumed from: a damaged file
    (a full disk, a copy cut short) or one that loads but is no checkpoint of this model
    (``checkpoint_problem``) is renamed ``*.corrupt`` (by rank 0 alone: ``move``), said so
    in one line, and training starts over."""
    if not path.exists():
        return None
    try:
        ck = load_checkpoint(path)
    except Exception as e:  # noqa: BLE001  -- torch raises many kinds for a damaged file
        ck, why = None, f"unreadable checkpoint ({one_line(e, with_type=True)[:200]})"
    else:
        problem = checkpoint_problem(ck, weights)
        if problem is None:
            return ck
        why = f"not a checkpoint to resume from ({problem[:200]})"
    if move:
        aside = set_aside(path)
        print(f"warning: {path}: {why}; kept as {aside.name}, training starts over", file=sys.stderr, flush=True)
    return None


def ema_states(workdir: Path | str) -> dict[int, Path]:
    """Training step -> the file holding the EMA weights at that step: the EMA snapshots of
    ``workdir`` and its checkpoint (the last step). Sorted by step."""
    workdir = Path(workdir)
    found = {int(p.stem.removeprefix("ema_step")): p for p in workdir.glob("ema_step*.pt")
             if p.stem.removeprefix("ema_step").isdigit()}
    if (workdir / CHECKPOINT).is_file():
        found[load_ema(workdir / CHECKPOINT)[0]] = workdir / CHECKPOINT
    return dict(sorted(found.items()))


def trained_precision(workdir: Path | str) -> str | None:
    """The precision the run in ``workdir`` trained in (its checkpoint's), or None where its
    checkpoint predates the field or is missing."""
    path = Path(workdir) / CHECKPOINT
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    precision = state.get("precision") if isinstance(state, dict) else None
    return precision if isinstance(precision, str) else None


def load_ema(path: Path) -> tuple[int, dict]:
    """(step, EMA state dict) from a snapshot or a checkpoint; memory-mapped, so reading a
    checkpoint does not read its optimizer state. A file without them: ValueError, one line."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not (isinstance(state, dict) and _is(state.get("step"), int) and isinstance(state.get("ema"), dict)):
        raise ValueError(f"{path}: not an EMA snapshot or checkpoint (no integer 'step' and 'ema' weights)")
    return state["step"], state["ema"]
