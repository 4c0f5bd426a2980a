"""The C-STORE SCU that returns results to the PACS (PS3.4 Annex B; the
export promise: docs/architecture.md §3).

:func:`send_batch` sends files to one destination over one association
(association reuse: a study's SEG and SR, or a backlog of many studies, cost
one negotiation). It proposes one presentation context per (SOP Class,
Transfer Syntax) found in the files' meta information, plus Explicit and
Implicit VR Little Endian for uncompressed files (PS3.5 §10.1: every SCP
takes Implicit VR Little Endian). A file whose own syntax was accepted is
sent as it is on disk, without decoding (pynetdicom's chunked send); an
uncompressed one may be re-encoded to an accepted uncompressed syntax.

Outcomes (PS3.4 B.2.3): Success and Warning mean stored; a Failure status,
no response, or no association at all mean failed, with a reason an operator
can act on. The peer's Error Comment is never kept: free text from a PACS may
name the patient.

A destination with a ``url`` is a DICOMweb service: :func:`send` is the one
seam that picks the transport, C-STORE here or STOW-RS (:mod:`scp.stow`);
both return a :class:`~pacsnode.db.exports.SendOutcome` per export row, so
the rows, their backoff and deadline are the same for both.

:func:`run_due` is the body of the ``export_due`` task: claim a destination's
due rows (:mod:`db.exports`), send them, record each outcome, next batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.status import code_to_category
from sqlalchemy import Engine

from pacsnode.core.settings import Destination, Settings
from pacsnode.db import exports
from pacsnode.db.exports import SendOutcome
from pacsnode.scp import scu, stow
from pacsnode.scp.scu import MAX_CONTEXTS
from pacsnode.scp.status import store_status_text

log = logging.getLogger(__name__)

BATCH_SIZE = 50
# run_due claims no new batch after this long (the task's limit is longer).
RUN_BUDGET_S = 120.0


@dataclass(frozen=True, slots=True)
class _Item:
    export_id: int
    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID

    def contexts(self) -> list[scu.Context]:
        return scu.contexts_for([(self.sop_class_uid, self.transfer_syntax_uid)])


def _read_meta(export_id: int, path: Path) -> _Item | SendOutcome:
    """The file's SOP Class, SOP Instance and Transfer Syntax UIDs, from its
    File Meta Information only (PS3.10 §7.1); pixel data is not read."""
    try:
        meta = read_file_meta_info(path)
        return _Item(
            export_id,
            path,
            UID(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            UID(meta.TransferSyntaxUID),
        )
    except FileNotFoundError:
        return SendOutcome(False, reason=f"file missing: {path.name}")
    except (OSError, AttributeError, ValueError, InvalidDicomError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "no valid DICOM file meta"
        return SendOutcome(False, reason=f"cannot read {path.name}: {reason}")


def _groups(items: list[_Item]) -> list[list[_Item]]:
    """Split items so each group's presentation contexts fit one association."""
    groups: list[list[_Item]] = []
    seen: set[tuple[UID, tuple[UID, ...]]] = set()
    for item in items:
        new = set(item.contexts()) - seen
        if not groups or len(seen) + len(new) > MAX_CONTEXTS:
            groups.append([])
            seen = set()
        groups[-1].append(item)
        seen |= set(item.contexts())
    return groups


@contextmanager
def _send_from_disk() -> Iterator[None]:
    """Let ``send_c_store(path)`` stream the file's encoded bytes instead of
    decoding it. pynetdicom reads this flag at each call; should another
    thread reset it meanwhile, that send decodes the file instead: slower,
    still correct."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def _store(assoc: Association, item: _Item, message_id: int) -> SendOutcome:
    exact = any(
        cx.abstract_syntax == item.sop_class_uid
        and cx.transfer_syntax
        and cx.transfer_syntax[0] == item.transfer_syntax_uid
        for cx in assoc.accepted_contexts
    )
    try:
        if exact:
            with _send_from_disk():
                rsp = assoc.send_c_store(item.path, msg_id=message_id)
        else:  # an uncompressed file, re-encoded to the accepted uncompressed syntax
            rsp = assoc.send_c_store(dcmread(item.path), msg_id=message_id)
    except ValueError:
        return SendOutcome(
            False,
            reason=f"no accepted presentation context for {item.sop_class_uid.name} "
            f"in {item.transfer_syntax_uid.name}",
        )
    except OSError as exc:
        return SendOutcome(False, reason=f"cannot read {item.path.name}: {exc.strerror}")
    if "Status" not in rsp:
        return SendOutcome(False, reason="no C-STORE response (timeout, abort or invalid reply)")
    code = int(rsp.Status)
    category = code_to_category(code)
    if category == "Success":
        return SendOutcome(True, code)
    if category == "Warning":  # PS3.4 B.2.3: stored, with coercion or discarded elements
        return SendOutcome(True, code, f"stored with warning {store_status_text(code)}")
    return SendOutcome(False, code, f"C-STORE {store_status_text(code)}")


def _send_group(
    assoc: Association,
    group: list[_Item],
    destination: Destination,
    outcomes: dict[int, SendOutcome],
) -> None:
    """C-STORE each item of ``group`` over ``assoc``; record each outcome."""
    where = destination.address
    for n, item in enumerate(group):
        if not assoc.is_established:
            lost = SendOutcome(
                False, reason=f"association with {where} lost after {n} of {len(group)}"
            )
            outcomes.update((rest.export_id, lost) for rest in group[n:])
            return
        outcome = _store(assoc, item, message_id=n % 65535 + 1)
        outcomes[item.export_id] = outcome
        if not outcome.sent or outcome.reason:
            log.warning(
                "export of %s to %s: %s", item.sop_instance_uid, destination.name, outcome.reason
            )


def send_batch(
    settings: Settings, destination: Destination, items: Sequence[tuple[int, Path]]
) -> dict[int, SendOutcome]:
    """C-STORE the files ``items`` (export id, path) to ``destination`` over
    one association (more only past 128 presentation contexts); return each
    export id's outcome. Never raises for network trouble: that is an outcome."""
    outcomes: dict[int, SendOutcome] = {}
    readable: list[_Item] = []
    for export_id, path in items:
        meta = _read_meta(export_id, path)
        if isinstance(meta, SendOutcome):
            log.warning("export %d to %s: %s", export_id, destination.name, meta.reason)
            outcomes[export_id] = meta
        else:
            readable.append(meta)
    peer = scu.Peer.of(destination)
    where = str(peer)
    for group in _groups(readable):
        contexts = list(dict.fromkeys(cx for item in group for cx in item.contexts()))
        try:
            with scu.associate(
                settings.ae_title,
                peer,
                contexts,
                timeout=settings.network_timeout_s,
                max_pdu=settings.max_pdu_size,
            ) as assoc:
                _send_group(assoc, group, destination, outcomes)
        except scu.ScuError as exc:  # no association: every object of the group waits
            log.warning("export to %s: %s; %d object(s) wait", destination.name, exc, len(group))
            unreached = SendOutcome(False, reason=str(exc), reached=False)
            outcomes.update((item.export_id, unreached) for item in group)
            continue
        stored = sum(outcomes[item.export_id].sent for item in group)
        log.info(
            "export to %s (%s): %d of %d object(s) stored on one association",
            destination.name,
            where,
            stored,
            len(group),
        )
    return outcomes


# --- one seam for both transports ---------------------------------------------------


def send(
    settings: Settings, destination: Destination, items: Sequence[tuple[int, Path]]
) -> dict[int, SendOutcome]:
    """Send the files ``items`` (export id, path) to ``destination``: by
    STOW-RS to a ``url`` (:func:`scp.stow.send_batch`), else by C-STORE
    (:func:`send_batch`); each export id's outcome."""
    if destination.url is not None:
        return stow.send_batch(settings, destination, items)
    return send_batch(settings, destination, items)


def configured(settings: Settings, row: Destination) -> Destination:
    """The row's destination with the TLS settings and credentials the
    configuration gives that name today (rows store neither). The row's
    address stands: a row keeps going where it says it goes."""
    current = exports.known_destinations(settings).get(row.name)
    if current is None:
        return row
    return row.model_copy(update={"tls": current.tls, "auth": current.auth})


# --- the export_due task's body ---------------------------------------------------


@dataclass
class RunSummary:
    sent: int = 0
    failed: int = 0
    batches: int = 0
    more: bool = False  # stopped at the time budget with rows still due
    unreachable: list[str] = field(default_factory=list)


def run_due(
    engine: Engine,
    settings: Settings,
    *,
    now: datetime | None = None,
    batch_size: int = BATCH_SIZE,
    budget_s: float = RUN_BUDGET_S,
) -> RunSummary:
    """Send due exports, a destination's batch at a time, until none is due
    or ``budget_s`` has passed. A destination that cannot be reached is not
    tried again in this run; its rows wait for their backoff. ``now`` fixes
    the clock (tests); by default the real UTC time at each step."""
    summary = RunSummary()
    start = time.monotonic()

    def clock() -> datetime:
        return now if now is not None else datetime.now(UTC)

    while True:
        if time.monotonic() - start > budget_s:
            summary.more = True
            return summary
        with engine.begin() as conn:
            claim = exports.claim_due(
                conn, now=clock(), limit=batch_size, exclude=summary.unreachable
            )
        if claim is None:
            return summary
        summary.batches += 1
        items = [(c.id, settings.spool_dir / c.path) for c in claim.items]
        try:
            outcomes = send(settings, configured(settings, claim.destination), items)
        except Exception as exc:  # a bug, not the network: record it on every row
            log.exception("export to %s failed unexpectedly", claim.destination.name)
            failed = SendOutcome(False, reason=f"internal error: {type(exc).__name__}")
            outcomes = {export_id: failed for export_id, _ in items}
        finished, draw = clock(), exports.spread()  # one jitter for the batch
        with engine.begin() as conn:
            for export_id, outcome in outcomes.items():
                if outcome.sent:
                    exports.mark_sent(
                        conn,
                        export_id,
                        claimed_at=claim.claimed_at,
                        now=finished,
                        status=outcome.status,
                    )
                    summary.sent += 1
                else:
                    exports.mark_failed(
                        conn,
                        export_id,
                        claimed_at=claim.claimed_at,
                        now=finished,
                        policy=settings.exports,
                        reason=outcome.reason,
                        status=outcome.status,
                        draw=draw,
                        permanent=outcome.permanent,
                    )
                    summary.failed += 1
        if any(not o.reached for o in outcomes.values()):
            summary.unreachable.append(claim.destination.name)
