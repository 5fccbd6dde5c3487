"""Files written whole or not at all, read only when they are regular files, and never
reached through a symbolic link.

A folder the tool owns (a results folder: ``own(root)``) is entered one component at a time
below its root, each opened relative to its parent's descriptor without following links
(``openat`` with ``O_NOFOLLOW``), so a link planted anywhere below the root, at any moment, is
refused rather than followed (the root itself may be a link the user made). A file is written
into a fresh temporary file beside it (``.<name>.<8 hex>.tmp``, created exclusively and held
with ``flock`` while written), synced, and renamed over the target; ``remove_stale_temps``
removes the temporary files of that naming whose writer is gone (a ``kill -9``).

Used by the results store, the report and training (checkpoints, sample grids); a lower layer
than all of them, so that training need not import the store.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

_OWNED: set[str] = set()  # absolute paths of the folders whose insides are never followed through a link
TEMP = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
STALE_AFTER_S = 60.0  # a temporary file this old whose writer holds no lock is a dead writer's
NAME_MAX = 255  # bytes in one file name on every file system the tool runs on
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class LinkError(OSError):
    """A symbolic link, or a file that is not a regular one, where the tool reads or writes."""


def own(folder: str | Path) -> None:
    """Declare ``folder`` a folder the tool writes in: below it, no link is ever followed."""
    _OWNED.add(os.path.abspath(folder))


def _anchored(folder: Path) -> tuple[str, list[str]]:
    """The owned folder that holds ``folder`` (the longest) and the components below it; a
    folder no owned one holds is its own anchor."""
    path = os.path.abspath(folder)
    best = None
    for root in _OWNED:
        if (path == root or path.startswith(root.rstrip(os.sep) + os.sep)) and (best is None or len(root) > len(best)):
            best = root
    if best is None:
        return path, []
    rest = os.path.relpath(path, best)
    return best, [] if rest == "." else rest.split(os.sep)


@contextlib.contextmanager
def folder(path: str | Path, *, create: bool = False) -> Iterator[int]:
    """A descriptor of the folder ``path``, entered without following any link below its
    anchor (see ``own``); with ``create``, missing components are made. Raises LinkError for a
    link (or a file) on the way, FileNotFoundError for a missing component."""
    anchor, parts = _anchored(Path(path))
    if create:
        os.makedirs(anchor, exist_ok=True)
    fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for i, part in enumerate(parts):
            if part in ("", ".", ".."):
                raise LinkError(errno.EINVAL, f"{path}: {part!r} in a path the tool writes")
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
            try:
                sub = os.open(part, _DIR, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise LinkError(e.errno, f"{os.path.join(anchor, *parts[:i + 1])} is a "
                                    "symbolic link or a file, not a folder; not followed (remove it)") from None
                raise
            os.close(fd)
            fd = sub
        yield fd
    finally:
        os.close(fd)


def make_folder(path: str | Path) -> Path:
    """``path`` made (with its parents) without following a link below its anchor."""
    with folder(path, create=True):
        return Path(path)


def _regular(fd: int, shown: str, *, one_link: bool = False) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a folder" if stat.S_ISDIR(st.st_mode) else "a device file")
        raise LinkError(errno.EINVAL, f"{shown}: {kind}, not a regular file")
    if one_link and st.st_nlink != 1:
        raise LinkError(errno.EMLINK, f"{shown}: a file with {st.st_nlink} hard links; not written through "
                        "(remove it)")
    return st


def _open_file(dirfd: int, name: str, flags: int, shown: str, *, one_link: bool = False) -> int:
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o666, dir_fd=dirfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LinkError(errno.ELOOP, f"{shown}: a symbolic link; not followed") from None
        raise
    try:
        _regular(fd, shown, one_link=one_link)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: str | Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path``, never through a link and never blocking on a
    FIFO or a device. Raises LinkError for anything else, ``OSError(EFBIG)`` above ``limit``."""
    path = Path(path)
    with folder(path.parent) as d:
        fd = _open_file(d, path.name, os.O_RDONLY, str(path))
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise OSError(errno.EFBIG, f"{path}: {size:,} bytes, more than the {limit:,} a record may have")
        return f.read() if limit is None else f.read(limit + 1)


def read_text(path: str | Path, limit: int | None = None) -> str:
    """``read_bytes`` decoded as UTF-8 (raises UnicodeDecodeError)."""
    return read_bytes(path, limit).decode("utf-8")


@contextlib.contextmanager
def open_lock(path: str | Path) -> Iterator[int]:
    """A descriptor of the lock file ``path`` (made if missing), open for writing only if it
    is a regular file with one link: never a planted link, FIFO or hard link to a file elsewhere."""
    path = Path(path)
    with folder(path.parent, create=True) as d:
        fd = _open_file(d, path.name, os.O_RDWR | os.O_CREAT, str(path), one_link=True)
    try:
        yield fd
    finally:
        os.close(fd)


def temp_name(name: str) -> str:
    """``.<name>.<8 hex>.tmp``, the name shortened so the whole fits in a file name."""
    room = NAME_MAX - len(".") - len(".12345678.tmp")
    short = name.encode("utf-8")[:room].decode("utf-8", errors="ignore")
    return f".{short}.{secrets.token_hex(4)}.tmp"


def _fresh(dirfd: int, name: str) -> tuple[str, int]:
    while True:
        tmp = temp_name(name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                         0o666, dir_fd=dirfd)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while written: remove_stale_temps leaves it alone
        return tmp, fd


def fresh_temp(path: Path) -> Path:
    """An empty file of a new temporary name beside ``path``, created exclusively (so never a
    planted link) with the permissions the umask gives, as any file the user makes."""
    path = Path(path)
    with folder(path.parent, create=True) as d:
        tmp, fd = _fresh(d, path.name)
        os.close(fd)
    return path.with_name(tmp)


def replace_with(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a fresh temporary file (``f`` a binary file object), synced, then
    renamed over ``path``: a crash or a full disk leaves the previous file intact and, but for
    a ``kill -9``, no temporary file behind; a link at ``path`` or on the way to it below an
    owned folder is refused, never followed."""
    path = Path(path)
    with folder(path.parent, create=True) as d:
        tmp, fd = _fresh(d, path.name)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path.name, src_dir_fd=d, dst_dir_fd=d)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=d)
            raise


def write_atomic(path: str | Path, text: str) -> None:
    replace_with(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def set_aside(path: str | Path) -> Path:
    """Rename an unreadable file to ``NAME.corrupt`` (``.corrupt1``, ... if taken), keeping it
    for a person to look at; returns the new path. Raises what the rename raises
    (FileNotFoundError: another process moved it first)."""
    path = Path(path)
    with folder(path.parent) as d:
        aside, n = path.name + ".corrupt", 1
        while _exists(d, aside):
            aside, n = f"{path.name}.corrupt{n}", n + 1
        os.rename(path.name, aside, src_dir_fd=d, dst_dir_fd=d)
    return path.with_name(aside)


def _exists(dirfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def remove_stale_temps(path: str | Path, *, older_than_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the temporary files of this module's naming in the folder ``path`` whose writer
    is gone: no ``flock`` held and not written to for ``older_than_s``. Links, folders and
    other names are left alone. Returns the names removed."""
    removed = []
    try:
        with folder(path) as d:
            for name in _abandoned(d, TEMP, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, older_than_s, regular=True):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=d)
                    removed.append(name)
    except (FileNotFoundError, NotADirectoryError, LinkError):
        pass
    return removed


def _abandoned(dirfd: int, pattern: re.Pattern, flags: int, older_than_s: float, *,
               regular: bool = False) -> Iterator[str]:
    """The entries of ``dirfd`` named by ``pattern`` that no writer holds: not modified for
    ``older_than_s`` and their ``flock`` free (taken while the name is yielded). Links are
    never opened through (``flags`` carry ``O_NOFOLLOW`` or ``O_DIRECTORY|O_NOFOLLOW``)."""
    for name in os.listdir(dirfd):
        if not pattern.fullmatch(name):
            continue
        try:
            fd = os.open(name, flags, dir_fd=dirfd)
        except OSError:
            continue  # a link, another kind of file, or gone
        try:
            st = os.fstat(fd)
            if (regular and not stat.S_ISREG(st.st_mode)) or time.time() - st.st_mtime < older_than_s:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is still writing
            yield name
        finally:
            os.close(fd)


def write_new(dirfd: int, name: str, data: bytes) -> None:
    """A new file ``name`` (never an existing one, nor a link) in the folder ``dirfd``, synced."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                 0o666, dir_fd=dirfd)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def fresh_folder(path: Path) -> Iterator[tuple[int, int, str]]:
    """A new empty folder of a temporary name beside ``path``, held with ``flock`` while in
    use (so ``remove_stale_folders`` leaves it alone): yields (parent fd, folder fd, its name).
    Removed on leaving unless renamed away."""
    with folder(path.parent, create=True) as parent:
        while True:
            name = temp_name(path.name)
            try:
                os.mkdir(name, 0o777, dir_fd=parent)
                break
            except FileExistsError:
                continue
        fd = os.open(name, _DIR, dir_fd=parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield parent, fd, name
        finally:
            os.close(fd)
            if _exists(parent, name):
                _rmtree(parent, name)


def _rmtree(dirfd: int, name: str) -> None:
    import shutil

    assert shutil.rmtree.avoids_symlink_attacks  # the fd-based walk: never follows a link out
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(name, dir_fd=dirfd)


def remove_stale_folders(path: Path, *, older_than_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the temporary folders of ``fresh_folder``'s naming beside ``path`` (for
    ``path``'s name only) that no living writer holds."""
    removed = []
    pattern = re.compile(re.escape(temp_name(path.name)[:-len(".12345678.tmp")]) + r"\.[0-9a-f]{8}\.tmp")
    try:
        with folder(path.parent) as parent:
            for name in _abandoned(parent, pattern, _DIR, older_than_s):
                _rmtree(parent, name)
                removed.append(name)
    except (FileNotFoundError, NotADirectoryError, LinkError):
        pass
    return removed


def exchange(dirfd: int, a: str, b: str) -> bool:
    """Swap the entries ``a`` and ``b`` of the folder ``dirfd`` in one step (Linux's
    ``renameat2(RENAME_EXCHANGE)``); False where the system has no such call."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(dirfd, os.fsencode(a), dirfd, os.fsencode(b), 2) == 0:  # 2: RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), b)
