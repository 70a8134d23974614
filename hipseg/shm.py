"""Shared cache files (the RAM cache, the loader's batch ring): where they go, and that they fit.

A file in ``/dev/shm`` that is mapped and written beyond the free space of its tmpfs
kills the writer with SIGBUS, without a message; containers get 64 MB there by default
(Docker, many Kubernetes pods). So every shared file is placed with its size known:

1. ``HIPSEG_CACHE_DIR`` (or an explicit folder), when set: always used;
2. ``/dev/shm`` when its free space holds the file with room to spare;
3. otherwise the temporary folder (``TMPDIR``): still one page-cache copy that every
   worker maps, only backed by disk, with one warning saying how to give the container
   more shared memory.

and its blocks are reserved with ``posix_fallocate`` before anything is written, so
running out of space is an ``OSError`` naming the folder, never a SIGBUS.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import uuid
import warnings
from pathlib import Path

from hipseg.errors import HipsegError

CACHE_DIR_ENV = "HIPSEG_CACHE_DIR"
SHM = Path("/dev/shm")
# Left free in /dev/shm for torch's own shared tensors and other processes.
HEADROOM_BYTES = 8 << 20


class CacheSpaceError(HipsegError, OSError):
    """A shared cache file does not fit where it must go."""


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process may still write in ``folder``'s filesystem (os.statvfs)."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


def cache_folder(nbytes: int, what: str, folder: str | Path | None = None) -> Path | None:
    """The folder for a shared file of ``nbytes``; None when it fits nowhere (then stream instead).

    Parameters
    ----------
    nbytes
        Size of the file.
    what
        Its name in messages ("RAM cache of 200 volumes").
    folder
        Where to put it; default ``$HIPSEG_CACHE_DIR``, else ``/dev/shm`` or the temporary folder.
    """
    chosen = folder or os.environ.get(CACHE_DIR_ENV)
    if chosen:
        path = Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
        if free_bytes(path) < nbytes:
            warnings.warn(f"hipseg: the {what} ({_mb(nbytes)}) does not fit in {path} "
                          f"({_mb(free_bytes(path))} free); reading volumes from the store instead",
                          stacklevel=3)
            return None
        return path
    shm_free = free_bytes(SHM) if SHM.is_dir() and os.access(SHM, os.W_OK) else -1
    if shm_free >= nbytes + HEADROOM_BYTES:
        return SHM
    temporary = Path(tempfile.gettempdir())
    room = f"{_mb(shm_free)} free in {SHM}" if shm_free >= 0 else f"no writable {SHM}"
    if free_bytes(temporary) >= nbytes:
        warnings.warn(f"hipseg: the {what} ({_mb(nbytes)}) does not fit in shared memory ({room}); "
                      f"using a file in {temporary} instead (shared by all workers, backed by disk). "
                      f"Give the container more with `docker run --shm-size=1g`, or choose the "
                      f"folder with {CACHE_DIR_ENV}", stacklevel=3)
        return temporary
    warnings.warn(f"hipseg: the {what} ({_mb(nbytes)}) fits neither in shared memory ({room}) nor "
                  f"in {temporary}; reading volumes from the store instead. Give the container "
                  f"more with `docker run --shm-size=1g`, or set {CACHE_DIR_ENV}", stacklevel=3)
    return None


def cache_name(prefix: str, identity: str) -> tuple[str, bool]:
    """File name of a shared cache, and whether this process removes it when done.

    Under torchrun with several processes on this node, every local rank of the job gets
    the same name for the same ``identity`` (store, volumes, layout), so the node holds
    one copy, filled by whichever rank comes first under the file lock, and local rank 0
    removes it. The name carries the torchrun agent's pid, so a file a killed job left is
    swept once the agent is gone. Elsewhere the name is this process's own.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        key = hashlib.sha256(f"{run_id}|{identity}".encode()).hexdigest()[:12]
        return f"{prefix}{os.getppid()}-{key}.bin", os.environ.get("LOCAL_RANK", "0") == "0"
    return f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:12]}.bin", True


def existing_folder(name: str, folder: str | Path | None = None) -> Path | None:
    """Where a cache file ``name`` (or its fill lock) already is, among the folders it may go to."""
    chosen = folder or os.environ.get(CACHE_DIR_ENV)
    candidates = [Path(chosen)] if chosen else [SHM, Path(tempfile.gettempdir())]
    for candidate in candidates:
        if (candidate / name).exists() or (candidate / (name + ".lock")).exists():
            return candidate
    return None


def allocate(path: str | Path, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` reserved (posix_fallocate), so writing it cannot SIGBUS.

    Raises
    ------
    CacheSpaceError
        The filesystem has no room for it (the partial file is removed).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(int(nbytes), 1))
    except OSError as error:
        os.close(fd)
        Path(path).unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheSpaceError(
                f"{path}: no room for {_mb(nbytes)} ({_mb(free_bytes(Path(path).parent))} free); "
                f"give the container more shared memory (`docker run --shm-size=1g`) or set "
                f"{CACHE_DIR_ENV} to a folder with room"
            ) from error
        raise
    os.close(fd)
