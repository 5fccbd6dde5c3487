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

    def _inside(path) -> bool:
        return os.path.realpath(os.fspath(path)).startswith(ro)

    def _refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def _ro_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _inside(path):
            _refuse(path)
        return _open(path, flags, *args, **kwargs)

    def _guard(real):
        def guarded(path, *args, **kwargs):
            if _inside(path):
                if real is _mkdir and os.path.exists(path):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
                _refuse(path)
            return real(path, *args, **kwargs)
        return guarded

    os.open, os.mkdir, os.replace, os.rename, os.unlink = (
        _ro_open, _guard(_mkdir), _guard(_replace), _guard(_rename), _guard(_unlink))
