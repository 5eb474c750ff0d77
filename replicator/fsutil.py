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
