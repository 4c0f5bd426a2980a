"""One handler per DIMSE/ACSE event; dependencies arrive as arguments.

The C-STORE handler does only fast, durable work (PS3.4 Annex B), the same
as STOW-RS (:func:`scp.ingest.ingest`): parse the few header attributes the
index needs from the file pynetdicom wrote while the data arrived, fsync it
and rename it into the spool, commit the index row, then answer. Decoding pixels and everything
else belongs in workers, because this thread holds up the sending modality.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from pacsnode.scp.indexer import AssociationSummary, GroupCommitIndexer
from pacsnode.scp.ingest import Expected, Origin, ingest
from pacsnode.scp.policy import AssociationGate
from pacsnode.scp.spool import Spool
from pacsnode.scp.status import StoreStatus, dimse_status

log = logging.getLogger(__name__)


@dataclass
class _Tally:
    stored: int = 0
    failed: int = 0
    groups: set[str] = field(default_factory=set)  # studies (or series) sent


@dataclass
class AssociationLog:
    """Per-association counts, logged once when the association ends."""

    _tallies: weakref.WeakKeyDictionary[Association, _Tally] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def tally(self, assoc: Association) -> _Tally:
        with self._lock:
            return self._tallies.setdefault(assoc, _Tally())

    def count(self, assoc: Association, ok: bool) -> None:
        tally = self.tally(assoc)
        if ok:
            tally.stored += 1
        else:
            tally.failed += 1

    def finish(self, assoc: Association, how: str) -> _Tally:
        with self._lock:
            tally = self._tallies.pop(assoc, _Tally())
        log.info(
            "association %s from %s@%s: %d stored, %d refused",
            how,
            assoc.requestor.ae_title,
            assoc.requestor.address,
            tally.stored,
            tally.failed,
        )
        return tally


def handle_echo(event: Event) -> int:
    """C-ECHO (PS3.4 Annex A): the node is up and accepts this peer."""
    return int(StoreStatus.SUCCESS)


def handle_store(
    event: Event, spool: Spool, indexer: GroupCommitIndexer, assoc_log: AssociationLog
) -> int | Dataset:
    """C-STORE: durable write, then index, then Success; never Success otherwise."""
    assoc = event.assoc
    try:
        _store(event, spool, indexer, assoc_log.tally(assoc).groups)
    except Exception as exc:
        status = dimse_status(exc)
        assoc_log.count(assoc, ok=False)
        # UIDs and AE titles only: never patient names or IDs in the log.
        log.warning(
            "C-STORE from %s refused with 0x%04X: %s (affected SOP instance %s)",
            assoc.requestor.ae_title,
            status,
            exc if status != StoreStatus.PROCESSING_FAILURE else type(exc).__name__,
            _printable(cast(C_STORE, event.request).AffectedSOPInstanceUID),
        )
        if status == StoreStatus.PROCESSING_FAILURE:
            log.debug("unexpected C-STORE error", exc_info=True)
            comment = "internal error, see the pacsnode log"
        else:
            comment = str(exc)
        rsp = Dataset()
        rsp.Status = int(status)
        # ErrorComment is LO: at most 64 characters (PS3.7 C.4.2).
        rsp.ErrorComment = comment[:64]
        return rsp
    assoc_log.count(assoc, ok=True)
    return int(StoreStatus.SUCCESS)


def _store(event: Event, spool: Spool, indexer: GroupCommitIndexer, groups_sent: set[str]) -> None:
    # pynetdicom has already written the data set, with File Meta, to a file
    # in the spool's incoming folder while the PDUs arrived (see scp.server).
    request = cast(C_STORE, event.request)
    record = ingest(
        event.dataset_path,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        origin=Origin(event.assoc.requestor.ae_title, event.assoc.requestor.address),
        spool=spool,
        indexer=indexer,
        groups_sent=groups_sent,
        expected=Expected(
            sop_class_uid=str(request.AffectedSOPClassUID).strip("\0 "),
            sop_instance_uid=str(request.AffectedSOPInstanceUID).strip("\0 "),
        ),
    )
    log.debug("stored %s from %s", record.sop_instance_uid, record.calling_ae_title)


def _printable(value: Any) -> str:
    text = str(value or "")
    return text if text.isprintable() and len(text) <= 64 else "<invalid>"


def handle_requested(event: Event, gate: AssociationGate) -> None:
    """A-ASSOCIATE-RQ: default-deny peer policy (see :mod:`scp.policy`)."""
    gate.check(event.assoc)


def handle_closed(event: Event, gate: AssociationGate) -> None:
    gate.closed(event.assoc)


def _summary(assoc: Association, tally: _Tally) -> AssociationSummary:
    requestor = assoc.requestor
    return AssociationSummary(
        ae_title=str(requestor.ae_title).strip(),
        host=str(requestor.address),
        port=int(requestor.port or 0),
        stored=tally.stored,
        refused=tally.failed,
    )


def handle_released(event: Event, assoc_log: AssociationLog, indexer: GroupCommitIndexer) -> None:
    tally = assoc_log.finish(event.assoc, "released")
    summary = _summary(event.assoc, tally)
    indexer.association_ended(sorted(tally.groups), released=True, summary=summary)


def handle_aborted(event: Event, assoc_log: AssociationLog, indexer: GroupCommitIndexer) -> None:
    tally = assoc_log.finish(event.assoc, "aborted")
    summary = _summary(event.assoc, tally)
    indexer.association_ended(sorted(tally.groups), released=False, summary=summary)


def handlers(
    spool: Spool, indexer: GroupCommitIndexer, gate: AssociationGate
) -> list[tuple[Any, ...]]:
    """The event → handler table the storage SCP binds, in one place."""
    assoc_log = AssociationLog()
    return [
        (evt.EVT_REQUESTED, handle_requested, [gate]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [spool, indexer, assoc_log]),
        (evt.EVT_RELEASED, handle_released, [assoc_log, indexer]),
        (evt.EVT_ABORTED, handle_aborted, [assoc_log, indexer]),
        (evt.EVT_CONN_CLOSE, handle_closed, [gate]),
    ]
