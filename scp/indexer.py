"""Group commit of index rows: concurrent C-STOREs share one transaction.

Each association thread submits its :class:`InstanceRecord` and waits; one
writer thread takes everything queued, writes it in one transaction and wakes
every waiter after the commit. A C-STORE therefore never answers Success
before its row is committed, while eight concurrent senders pay for roughly
one commit instead of eight.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

from sqlalchemy import Connection, Engine

from db.index import InstanceRecord, SeriesCache, upsert_instances
from pacsnode.errors import IndexUnavailable

log = logging.getLogger(__name__)

_STOP = object()


class GroupCommitIndexer:
    """A writer thread that commits queued index records in batches."""

    def __init__(self, engine: Engine, max_batch: int = 256) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._series = SeriesCache()
        # One connection for the writer thread's life: a pool checkout per
        # commit costs more than the commit itself. Reopened after an error.
        self._conn: Connection | None = None
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def index(self, record: InstanceRecord, timeout: float = 60.0) -> None:
        """Return once ``record`` is committed; raise IndexUnavailable otherwise."""
        done: Future[None] = Future()
        self._queue.put((record, done))
        try:
            done.result(timeout)
        except TimeoutError:
            raise IndexUnavailable("the index did not commit in time") from None

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _reset_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                log.debug("closing a failed index connection", exc_info=True)
            self._conn = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._reset_connection()
                return
            batch = [item]
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(more)
            self._commit(batch)  # type: ignore[arg-type]

    def _commit(self, batch: list[tuple[InstanceRecord, Future[None]]]) -> None:
        try:
            if self._conn is None:
                self._conn = self._engine.connect()
            with self._conn.begin():
                upsert_instances(self._conn, [record for record, _ in batch], self._series)
        except Exception as exc:  # the writer thread must outlive any error
            self._series.clear()  # a cached row may be what failed
            self._reset_connection()
            if len(batch) > 1:
                # One bad record must not fail its neighbours: retry one by one.
                for item in batch:
                    self._commit([item])
                return
            # Log the class only: database messages can quote patient data.
            log.error("index commit failed: %s", type(exc).__name__)
            batch[0][1].set_exception(
                IndexUnavailable(f"the index database failed: {type(exc).__name__}")
            )
            return
        for _, done in batch:
            done.set_result(None)
