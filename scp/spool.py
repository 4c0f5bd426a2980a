"""The spool: received instances as DICOM Part 10 files, written durably.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
UIDs are checked against the PS3.5 grammar before they reach this module, so
they are safe path components. pynetdicom writes each arriving data set to a
file in ``<spool>/.incoming``; :meth:`Spool.adopt` fsyncs it, renames it over
its final name and fsyncs the directory: once it returns, the file survives a
crash or a power cut, and a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from pacsnode.core.errors import OutOfResources
from pacsnode.core.layout import INCOMING, durable_replace, fsync_dir


def spool_relpath(study_uid: str, series_uid: str, sop_uid: str) -> str:
    return f"{study_uid}/{series_uid}/{sop_uid}.dcm"


class Spool:
    """Durable file store for received instances, safe for concurrent threads."""

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()
        self.incoming.mkdir(parents=True, exist_ok=True)

    def check_space(self, incoming: int) -> None:
        """Refuse below the free-space watermark (Out of Resources)."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free - incoming < self.min_free_bytes:
            raise OutOfResources(
                f"free disk space {free // 2**20} MiB is below the watermark "
                f"{self.min_free_bytes // 2**20} MiB"
            )

    def _ensure_dir(self, path: Path) -> None:
        if path in self._known_dirs:
            return
        with self._lock:
            missing: list[Path] = []
            probe = path
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            for directory in reversed(missing):
                directory.mkdir(exist_ok=True)
                # The new entry lives in the parent: make it durable there.
                fsync_dir(directory.parent)
            self._known_dirs.add(path)

    @property
    def incoming(self) -> Path:
        """Where pynetdicom writes data sets while they arrive (same file
        system as the spool, so adopting one is a rename, not a copy)."""
        return self.root / INCOMING

    def clear_incoming(self) -> int:
        """Remove partial data sets left by a crash: none was acknowledged."""
        removed = 0
        for leftover in self.incoming.glob("*"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def adopt(self, received: Path, relpath: str) -> int:
        """Make a received file durable under ``relpath``: fsync, rename into
        place, fsync the directory (:func:`pacsnode.core.layout.durable_replace`).
        Returns its size in bytes."""
        final = self.root / relpath
        self._ensure_dir(final.parent)
        return durable_replace(received, final)

    def path(self, relpath: str) -> Path:
        return self.root / relpath
