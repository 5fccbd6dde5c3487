"""Faults for tests, switched on by environment variables (tests run as root, for whom
chmod does not make a folder read-only):

    ABLATE_FULL_DISK=checkpoint   torch.save writes part of its file, then fails with ENOSPC
    ABLATE_FULL_DISK=all          ... and so does every fsync (every store file)
    ABLATE_READ_ONLY=DIR          creating, renaming or removing anything under DIR fails with EROFS
"""
import errno
import os

import torch

_save, _fsync = torch.save, os.fsync
_open, _mkdir, _replace, _rename, _unlink = os.open, os.mkdir, os.replace, os.rename, os.unlink


def _enospc(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _partial_save(obj, f, *args, **kwargs):
    if hasattr(f, "write"):
        f.write(b"PK\x03\x04 half a checkpoint")
    else:
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
    _enospc()


mode = os.environ.get("ABLATE_FULL_DISK")
if mode:
    torch.save = _partial_save
if mode == "all":
    os.fsync = _enospc

ro = os.environ.get("ABLATE_READ_ONLY")
if ro:
    ro = os.path.realpath(ro)

    def _inside(path, dir_fd=None) -> bool:
        if dir_fd is not None:  # a name relative to an open folder
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), os.fspath(path))
        return os.path.realpath(os.fspath(path)).startswith(ro)

    def _refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def _ro_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _inside(path, kwargs.get("dir_fd")):
            _refuse(path)
        return _open(path, flags, *args, **kwargs)

    def _guard(real):
        def guarded(path, *args, **kwargs):
            if _inside(path, kwargs.get("dir_fd", kwargs.get("src_dir_fd"))):
                if real is _mkdir and _exists(path, kwargs.get("dir_fd")):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
                _refuse(path)
            return real(path, *args, **kwargs)
        return guarded

    def _exists(path, dir_fd) -> bool:
        try:
            os.stat(path, dir_fd=dir_fd)
            return True
        except FileNotFoundError:
            return False

    os.open, os.mkdir, os.replace, os.rename, os.unlink = (
        _ro_open, _guard(_mkdir), _guard(_replace), _guard(_rename), _guard(_unlink))
