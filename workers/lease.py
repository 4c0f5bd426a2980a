"""A worker's lease on the job it runs, kept alive by a heartbeat thread.

The task claims the job (:func:`pacsnode.db.jobs.claim`) with the fence its
message carries, then runs the job's stages inside :class:`Heartbeat`: a
thread renews the lease every third of ``job_heartbeat_timeout_s``, and the
pipeline calls :meth:`Heartbeat.guard` before each stage and in the
transaction that writes the results, so a worker whose lease was taken back
stops there (:class:`~pacsnode.core.errors.LeaseLost`) and commits nothing
over the new attempt. A worker killed outright renews nothing: the
dispatcher takes the job back once the lease expired (docs/reliability.md).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import UTC, datetime, timedelta
from types import TracebackType

from sqlalchemy import Connection, Engine

from pacsnode.core.errors import LeaseLost
from pacsnode.db import jobs

log = logging.getLogger(__name__)


def owner() -> str:
    """Who holds a lease: this host and process."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def expiry(timeout_s: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=timeout_s)


class Heartbeat:
    """Renews ``lease`` every ``timeout_s / 3`` seconds while the block runs."""

    def __init__(self, engine: Engine, lease: jobs.Lease, timeout_s: float) -> None:
        self.engine = engine
        self.lease = lease
        self.timeout_s = timeout_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-job-{lease.job_id}", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.timeout_s / 3):
            try:
                with self.engine.begin() as conn:
                    held = jobs.renew(conn, self.lease, expiry(self.timeout_s))
            except Exception as exc:  # the database is away: try again next beat
                log.warning("job %d: lease not renewed (%s)", self.lease.job_id, type(exc).__name__)
                continue
            if not held:
                log.warning(
                    "job %d: lease lost (another attempt has the job); this worker stops",
                    self.lease.job_id,
                )
                self.lost.set()
                return

    def guard(self, conn: Connection) -> None:
        """In the caller's transaction: renew the lease, or raise.

        Raises:
            LeaseLost: the job went to another attempt.
        """
        if self.lost.is_set() or not jobs.renew(conn, self.lease, expiry(self.timeout_s)):
            self.lost.set()
            raise LeaseLost(f"job {self.lease.job_id}: lease lost to another attempt")
