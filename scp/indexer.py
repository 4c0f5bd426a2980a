"""Group commit of index rows: concurrent C-STOREs share one transaction.

Each association thread submits its :class:`InstanceRecord` and waits; one
writer thread takes everything queued, writes it in one transaction and wakes
every waiter after the commit. A C-STORE therefore never answers Success
before its row is committed, while eight concurrent senders pay for roughly
one commit instead of eight. The same transaction records the arrival in the
study assembly state (db.assembly), so no acknowledged instance escapes the
assembler; the end of an association goes through the same queue, after its
instances.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from pacsnode.core.errors import IndexUnavailable
from pacsnode.db import audit
from pacsnode.db.assembly import Arrival, close_associations, note_arrivals
from pacsnode.db.index import InstanceRecord, SeriesCache, upsert_instances

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(frozen=True)
class _Store:
    record: InstanceRecord
    opens: bool  # the association's first instance of this group
    done: Future[None]


@dataclass(frozen=True)
class AssociationSummary:
    """What an association did, for its audit row (PS3.8 A-RELEASE/A-ABORT)."""

    ae_title: str
    host: str
    port: int
    stored: int
    refused: int


@dataclass(frozen=True)
class _Close:
    key_uids: tuple[str, ...]
    released: bool
    at: datetime
    summary: AssociationSummary | None = None


def group_key(record: InstanceRecord, grouping: str) -> str:
    """The UID a group is assembled under: its study, or its series."""
    return record.series_instance_uid if grouping == "series" else record.study_instance_uid


class GroupCommitIndexer:
    """A writer thread that commits queued index records in batches."""

    def __init__(
        self,
        engine: Engine,
        grouping_for: Callable[[str], str] = lambda ae_title: "study",
        max_batch: int = 256,
    ) -> None:
        self._engine = engine
        self._grouping_for = grouping_for
        self._max_batch = max_batch
        self._series = SeriesCache()
        # One connection for the writer thread's life: a pool checkout per
        # commit costs more than the commit itself. Reopened after an error.
        self._conn: Connection | None = None
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def grouping(self, record: InstanceRecord) -> str:
        return self._grouping_for(record.calling_ae_title)

    def index(self, record: InstanceRecord, opens: bool = False, timeout: float = 60.0) -> None:
        """Return once ``record`` is committed; raise IndexUnavailable otherwise.
        ``opens``: the first instance of its group on this association."""
        done: Future[None] = Future()
        self._queue.put(_Store(record, opens, done))
        try:
            done.result(timeout)
        except TimeoutError:
            raise IndexUnavailable("the index did not commit in time") from None

    def index_many(
        self, items: Sequence[tuple[InstanceRecord, bool]], timeout: float = 60.0
    ) -> list[BaseException | None]:
        """Queue every ``(record, opens)`` at once (they share commits) and wait
        for all: for each, None once committed, or the error that refused it."""
        futures: list[Future[None]] = []
        for record, opens in items:
            done: Future[None] = Future()
            self._queue.put(_Store(record, opens, done))
            futures.append(done)
        outcomes: list[BaseException | None] = []
        for done in futures:
            try:
                done.result(timeout)
                outcomes.append(None)
            except TimeoutError:
                outcomes.append(IndexUnavailable("the index did not commit in time"))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def association_ended(
        self,
        key_uids: Sequence[str],
        released: bool,
        summary: AssociationSummary | None = None,
    ) -> None:
        """Record (without waiting) that an association which sent these
        groups was released or aborted, with its audit row when ``summary``
        is given (in the same transaction)."""
        if key_uids or summary is not None:
            self._queue.put(_Close(tuple(key_uids), released, datetime.now(UTC), summary))

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
            stores = [item for item in batch if isinstance(item, _Store)]
            closes = [item for item in batch if isinstance(item, _Close)]
            if stores:
                self._commit(stores)
            if closes:
                self._close(closes)

    def _arrivals(self, stores: list[_Store], pks: dict[str, tuple[int, int]]) -> list[Arrival]:
        groups: dict[str, Arrival] = {}
        for item in stores:
            r = item.record
            grouping = self.grouping(r)
            key = group_key(r, grouping)
            study_pk, series_pk = pks[r.series_instance_uid]
            seen = groups.get(key)
            groups[key] = Arrival(
                key_uid=key,
                grouping=grouping,
                study_pk=study_pk,
                series_pk=series_pk if grouping == "series" else None,
                calling_ae_title=r.calling_ae_title,
                received_at=max(r.received_at, seen.received_at) if seen else r.received_at,
                opens=(seen.opens if seen else 0) + int(item.opens),
            )
        return list(groups.values())

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self._engine.connect()
        return self._conn

    def _close(self, closes: list[_Close]) -> None:
        try:
            conn = self._connection()
            with conn.begin():
                for close in closes:
                    if close.key_uids:
                        close_associations(conn, close.key_uids, close.released, close.at)
                    if close.summary is not None:
                        _audit_association(conn, close)
        except Exception as exc:
            # The assembler's quiet period still completes these groups.
            self._reset_connection()
            log.error("recording the end of an association failed: %s", type(exc).__name__)

    def _commit(self, batch: list[_Store], fresh: bool = False) -> None:
        try:
            conn = self._connection()
            with conn.begin():
                records = [item.record for item in batch]
                pks = upsert_instances(conn, records, self._series)
                note_arrivals(conn, self._arrivals(batch, pks))
        except Exception as exc:  # the writer thread must outlive any error
            self._series.clear()  # a cached row may be what failed
            self._reset_connection()
            if not fresh and isinstance(exc, DBAPIError) and exc.connection_invalidated:
                # The held connection died (database restarted or failed
                # over): the transaction rolled back, so the same batch goes
                # again once on a new connection instead of refusing it.
                log.warning("index connection lost; reconnecting")
                self._commit(batch, fresh=True)
                return
            if len(batch) > 1:
                # One bad record must not fail its neighbours: retry one by one.
                for item in batch:
                    self._commit([item])
                return
            # Log the class only: database messages can quote patient data.
            log.error("index commit failed: %s", type(exc).__name__)
            batch[0].done.set_exception(
                IndexUnavailable(f"the index database failed: {type(exc).__name__}")
            )
            return
        for item in batch:
            item.done.set_result(None)


def _audit_association(conn: Connection, close: _Close) -> None:
    assert close.summary is not None
    s = close.summary
    audit.record(
        conn,
        audit.Actor("dicom", s.ae_title, f"{s.host}:{s.port}"),
        "association.released" if close.released else "association.aborted",
        target=f"{len(close.key_uids)} group(s)",
        outcome="ok" if s.refused == 0 else "partial",
        detail={"stored": s.stored, "refused": s.refused, "groups": list(close.key_uids)},
        at=close.at,
    )
