"""The data folder's layout, and the one way files in it are written durably.

Everything the node keeps on disk lives under ``data_dir``
(:class:`DataLayout`); no module joins those folder names itself::

    <data_dir>/
      spool/<Study>/<Series>/<SOP>.dcm   received instances and AI outputs
      spool/.incoming/                   data sets while they arrive (cleared at start-up)
      results/                           segmentation masks (.npz)
      cache/preprocessed/                preprocessed model inputs (.npy)
      broker/{queue,processed,control}/  the embedded Celery broker
      pacsnode.db                        the SQLite database (when no database_url)

Durability (docs/architecture.md, the durability contract): a file is
written whole or not at all. :func:`atomic_write` (and :func:`atomic_path`
for writers that want a path, such as Keras) fills a temporary file in the
target's own folder, fsyncs it, renames it over the target and fsyncs the
folder; :func:`durable_replace` is that last step alone, for a file written
elsewhere on the same file system (the spool adopting what pynetdicom wrote).
Once they return, the file survives a crash or a power cut, and a reader
never sees it half-written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

INCOMING = ".incoming"  # inside the spool: same file system, so adopting is a rename


@dataclass(frozen=True, slots=True)
class DataLayout:
    """Where each kind of file lives under ``root`` (the ``data_dir`` setting)."""

    root: Path

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def incoming(self) -> Path:
        return self.spool / INCOMING

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def preprocessed(self) -> Path:
        return self.cache / "preprocessed"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def database(self) -> Path:
        """The SQLite database file used when ``database_url`` is empty."""
        return self.root / "pacsnode.db"


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (a new or renamed file) durable.
    Raises ``OSError`` when the folder cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(source: Path, target: Path) -> int:
    """fsync ``source``, rename it over ``target`` (same file system), fsync
    ``target``'s folder; return the file's size in bytes. Raises ``OSError``
    (source missing, another file system, no space) with ``target`` untouched."""
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    os.replace(source, target)
    fsync_dir(target.parent)
    return size


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; when the
    block returns, it is made durable over ``path`` (:func:`durable_replace`);
    when it raises, it is removed and ``path`` is untouched. ``suffix``: for
    writers that insist on a file name ending (``.weights.h5``). Creates the
    parent folder when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, content: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write ``path`` whole or not at all: ``content`` (bytes, UTF-8 text, or
    a function that writes to the open binary file) goes to a temporary file
    beside it, which is fsynced and renamed over ``path``, and the folder is
    fsynced. Whatever ``content`` raises propagates, with ``path`` untouched;
    ``OSError`` when the folder is not writable or the disk is full."""
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        if isinstance(content, str):
            fh.write(content.encode("utf-8"))
        elif isinstance(content, bytes):
            fh.write(content)
        else:
            content(fh)
