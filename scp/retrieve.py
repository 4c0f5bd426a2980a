"""C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3) over everything indexed.

Both follow pynetdicom's generator protocol: a C-MOVE handler yields the
destination ``(host, port, associate kwargs)``, then the number of
sub-operations, then ``(0xFF00, data set)`` per instance; a C-GET handler
the same without the destination. pynetdicom performs each C-STORE
sub-operation, sends a Pending response with the sub-operation counts after
each, and ends with Success, Warning 0xB000 (some failed, with the Failed
SOP Instance UID List) or 0xA702 (all failed).

- C-MOVE: the Move Destination is resolved with
  :meth:`~pacsnode.settings.Settings.move_destination` (a configured
  destination with that AE title, else a peer with a port); unknown → 0xA801.
  One association to it carries every instance of the move. It proposes one
  presentation context per (SOP class, stored transfer syntax) of the
  matched instances, adding Explicit and Implicit VR Little Endian for data
  sets stored uncompressed (pynetdicom converts between those); a compressed
  data set is sent only in its own transfer syntax, never decoded.
- C-GET: the C-STOREs go back over the requestor's association, in the
  storage contexts it proposed with the SCP role (role selection: see
  :func:`scp.server.build_ae`).

Data sets are read from the spool as stored; pixel data is sent unchanged.
A file that cannot be read counts as a failed sub-operation, listed by its
SOP Instance UID. A C-CANCEL is checked before each sub-operation.

pynetdicom's protocol has no way for a C-MOVE handler to answer a failure
before it names a destination, so an invalid C-MOVE identifier (or an
index that cannot be read) ends in pynetdicom's "Unable to process" (0xC514),
and this module logs the reason.
A C-GET handler can: it announces one sub-operation, then answers 0xA900
(or 0xA701) with an ErrorComment, which pynetdicom reports with one failed
sub-operation.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import code_to_category
from sqlalchemy import Engine

from pacsnode.core.errors import InvalidQuery
from pacsnode.core.settings import Settings
from pacsnode.db.qr import InformationModel, StoredInstance, instances, retrieve_query
from pacsnode.scp.query import failure as failure_status
from pacsnode.scp.query import handle_find, read_identifier
from pacsnode.scp.status import QRStatus

log = logging.getLogger(__name__)

MOVE_MODELS: dict[str, InformationModel] = {
    str(PatientRootQueryRetrieveInformationModelMove): InformationModel.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelMove): InformationModel.STUDY_ROOT,
}
GET_MODELS: dict[str, InformationModel] = {
    str(PatientRootQueryRetrieveInformationModelGet): InformationModel.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelGet): InformationModel.STUDY_ROOT,
}
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255
_UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_LOGGED_STUDIES = 5


@dataclass
class _Outcome:
    """C-STORE results, counted from the responses as they arrive."""

    completed: int = 0
    warnings: int = 0

    def on_dimse_recv(self, event: Event) -> None:
        message = event.message
        if isinstance(message, C_STORE_RSP):
            category = code_to_category(int(message.command_set.Status))
            self.completed += category == "Success"
            self.warnings += category == "Warning"


def _no_delay(event: Event) -> None:
    """Disable Nagle on the move association: the tail segment of each data
    set would otherwise wait for the destination's delayed ACK (about 40 ms
    per instance on Linux). Accepted sockets get this in scp.server."""
    transport = event.assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _offered_as_uncompressed_le(transfer_syntax: str) -> bool:
    try:
        uid = UID(transfer_syntax)
        return not uid.is_compressed and uid.is_little_endian
    except ValueError:  # a private transfer syntax: send it only as it is
        return False


def presentation_contexts(matched: Sequence[StoredInstance]) -> list[PresentationContext]:
    """One context per (SOP class, stored transfer syntax), at most 128."""
    pairs = dict.fromkeys((i.sop_class_uid, i.transfer_syntax_uid) for i in matched)
    contexts = []
    for sop_class, transfer_syntax in pairs:
        syntaxes = [transfer_syntax]
        if _offered_as_uncompressed_le(transfer_syntax):
            syntaxes += [ts for ts in _UNCOMPRESSED_LE if ts != transfer_syntax]
        contexts.append(build_context(sop_class, syntaxes))
    if len(contexts) > MAX_CONTEXTS:
        log.warning(
            "%d presentation contexts needed, %d proposed: instances of the rest fail",
            len(contexts),
            MAX_CONTEXTS,
        )
    return contexts[:MAX_CONTEXTS]


def _load(spool_dir: Path, instance: StoredInstance) -> Dataset:
    try:
        return dcmread(spool_dir / instance.path)
    except Exception as exc:
        log.warning(
            "cannot read %s from the spool (%s): sub-operation fails",
            instance.sop_instance_uid,
            type(exc).__name__,
        )
        # pynetdicom cannot send this stub (no SOP Class UID, no transfer
        # syntax): it counts the sub-operation as failed and lists the UID.
        stub = Dataset()
        stub.SOPInstanceUID = instance.sop_instance_uid
        return stub


def _match(event: Event, engine: Engine, model: InformationModel) -> list[StoredInstance]:
    request = read_identifier(event.identifier)
    query = retrieve_query(model, request.level, request.keys)
    return instances(engine, query)


def _sub_operations(
    event: Event, matched: Sequence[StoredInstance], spool_dir: Path
) -> Iterator[tuple[int, Dataset | None]]:
    for instance in matched:
        if event.is_cancelled:
            yield int(QRStatus.CANCEL), None
            return
        yield int(QRStatus.PENDING), _load(spool_dir, instance)


def _summary(matched: Sequence[StoredInstance], outcome: _Outcome) -> str:
    studies = list(dict.fromkeys(i.study_instance_uid for i in matched))
    shown = ", ".join(studies[:_LOGGED_STUDIES]) + (
        ", ..." if len(studies) > _LOGGED_STUDIES else ""
    )
    failed = len(matched) - outcome.completed - outcome.warnings
    return (
        f"{len(matched)} instance(s) of {len(studies)} study(ies) [{shown}]: "
        f"{outcome.completed} completed, {outcome.warnings} warning, {failed} failed/not sent"
    )


def handle_move(event: Event, engine: Engine, settings: Settings) -> Iterator[Any]:
    """C-MOVE: send the matched instances to the Move Destination."""
    calling = event.assoc.requestor.ae_title
    requested = str(event.move_destination or "")
    destination = settings.move_destination(requested)
    if destination is None:
        shown = requested if requested.isprintable() and len(requested) <= 16 else "<invalid>"
        log.warning("C-MOVE from %s to unknown destination %r refused (0xA801)", calling, shown)
        yield None, None  # pynetdicom answers 0xA801, Move Destination unknown
        return
    model = MOVE_MODELS[str(event.request.AffectedSOPClassUID)]
    try:
        matched = _match(event, engine, model)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, InvalidQuery) else type(exc).__name__
        log.warning("C-MOVE (%s) from %s refused: %s", model.value, calling, reason)
        raise
    if not matched:
        log.info("C-MOVE (%s) from %s: no instance matched", model.value, calling)
    outcome = _Outcome()
    yield (
        destination.host,
        destination.port,
        {
            "ae_title": destination.ae_title,
            "contexts": presentation_contexts(matched),
            "evt_handlers": [
                (evt.EVT_CONN_OPEN, _no_delay),
                (evt.EVT_DIMSE_RECV, outcome.on_dimse_recv),
            ],
        },
    )
    yield len(matched)
    target = destination.address
    for response in _sub_operations(event, matched, settings.spool_dir):
        if response[0] == QRStatus.CANCEL:
            log.info(
                "C-MOVE from %s to %s cancelled: %s", calling, target, _summary(matched, outcome)
            )
        yield response
    log.info("C-MOVE from %s to %s: %s", calling, target, _summary(matched, outcome))


def handle_get(event: Event, engine: Engine, spool_dir: Path) -> Iterator[Any]:
    """C-GET: send the matched instances back over the requestor's association."""
    calling = event.assoc.requestor.ae_title
    model = GET_MODELS[str(event.request.AffectedSOPClassUID)]
    try:
        matched = _match(event, engine, model)
    except Exception as exc:
        rsp = failure_status(exc, retrieve=True)
        reason = str(exc) if isinstance(exc, InvalidQuery) else type(exc).__name__
        log.warning(
            "C-GET (%s) from %s refused with 0x%04X: %s", model.value, calling, rsp.Status, reason
        )
        yield 1  # pynetdicom takes a failure status only after a count
        yield rsp, None
        return
    if not matched:
        log.info("C-GET (%s) from %s: no instance matched", model.value, calling)
    outcome = _Outcome()
    handler = outcome.on_dimse_recv
    event.assoc.bind(evt.EVT_DIMSE_RECV, handler)
    try:
        yield len(matched)
        for response in _sub_operations(event, matched, spool_dir):
            if response[0] == QRStatus.CANCEL:
                log.info("C-GET from %s cancelled: %s", calling, _summary(matched, outcome))
            yield response
        log.info("C-GET from %s: %s", calling, _summary(matched, outcome))
    finally:
        event.assoc.unbind(evt.EVT_DIMSE_RECV, handler)


def query_retrieve_handlers(engine: Engine, settings: Settings) -> list[tuple[Any, ...]]:
    """The Query/Retrieve event → handler table, bound beside :func:`scp.handlers.handlers`."""
    return [
        (evt.EVT_C_FIND, handle_find, [engine, settings.ae_title]),
        (evt.EVT_C_MOVE, handle_move, [engine, settings]),
        (evt.EVT_C_GET, handle_get, [engine, settings.spool_dir]),
    ]
