"""Files written whole or not at all, never through a symbolic link, with the umask's
permissions: a fresh temporary file beside the target, renamed over it.

Used by the results store and by training (checkpoints, sample grids); a lower layer than
both, so that training need not import the store.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Callable


def fresh_temp(path: Path) -> Path:
    """An empty file of a new name beside ``path``, created exclusively (so never a planted
    symbolic link) with the permissions the umask gives, as any file the user makes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
            return tmp
        except FileExistsError:
            continue


def replace_with(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a fresh temporary file, then rename it over ``path``: a crash or a
    full disk leaves the previous file intact and no temporary file behind, and a symbolic
    link at ``path`` is replaced, not followed."""
    tmp = fresh_temp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    replace_with(path, write)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def set_aside(path: Path) -> Path:
    """Rename an unreadable file to ``NAME.corrupt`` (``.corrupt1``, ... if taken), keeping it
    for a person to look at; returns the new path. Raises what the rename raises
    (FileNotFoundError: another process moved it first)."""
    aside, n = path.with_name(path.name + ".corrupt"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.corrupt{n}"), n + 1
    os.rename(path, aside)
    return aside
