"""Durable file operations: write to a temp name, fsync, rename, fsync the directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename or unlink inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A hidden temp name beside path, unique per call."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


def write_atomic(path: str | os.PathLike, writer: Callable[[BinaryIO], None] | bytes, *, durable: bool = True) -> None:
    """Create or replace path with what writer writes; readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if isinstance(writer, (bytes, bytearray, memoryview)):
                f.write(writer)
            else:
                writer(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """os.pwrite until every byte is written (a short write is retried from where it
    stopped; a write of nothing is ENOSPC)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(28, "No space left on device")
        view, offset = view[n:], offset + n


_fallocate: Callable[..., int] | None | bool = False  # False: not looked up yet


def preallocate(fd: int, length: int) -> bool:
    """Reserve the blocks of an empty file up to length, and make that its size (Linux
    fallocate, mode 0), so that writes filling it in skip the filesystem's block allocation
    one page at a time (a 256 MiB restore's page-cache writes: 0.061 -> 0.045 s). Where the
    call does not exist or fails (a filesystem without it, ENOSPC, a size past the largest
    file) the file is truncated back to empty and False returned: the writes then allocate
    as they go, and report any real shortage of space themselves."""
    global _fallocate
    if _fallocate is False:
        _fallocate = None
        try:
            import ctypes

            f = ctypes.CDLL(None, use_errno=True).fallocate
            f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
            f.restype = ctypes.c_int
            _fallocate = f
        except (OSError, AttributeError):
            pass
    if _fallocate is None or length <= 0:
        return False
    if _fallocate(fd, 0, 0, length) == 0:
        return True
    os.ftruncate(fd, 0)  # blocks a failed call may have reserved
    return False


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Callable[..., int] | None | bool = False  # False: not looked up yet


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range of the file to disk, without waiting
    (Linux sync_file_range with SYNC_FILE_RANGE_WRITE): a later fsync then has less left
    to wait for. It promises nothing about durability; where the call does not exist (or
    fails) this does nothing, and the fsync does all the work as before."""
    global _sync_file_range
    if _sync_file_range is False:
        _sync_file_range = None
        try:
            import ctypes

            f = ctypes.CDLL(None, use_errno=True).sync_file_range
            f.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            f.restype = ctypes.c_int
            _sync_file_range = f
        except (OSError, AttributeError):
            pass
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
