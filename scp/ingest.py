"""Ingesting one received instance: the durability contract C-STORE and
STOW-RS share.

The encoded data set (a Part 10 file with its File Meta Information) is
already on disk in the spool's incoming folder: pynetdicom wrote it while the
PDUs arrived, or STOW-RS streamed it there from the request body. Ingesting
it checks the disk watermark, parses the header attributes the index needs
(never the pixel data), checks the UIDs the node files it by (PS3.5 §9.1,
so they are safe path components), fsyncs and renames the file into the
spool, and commits its index row (group commit, with its arrival recorded
for study assembly) before returning. Any refusal is a
:class:`~pacsnode.core.errors.PacsnodeError` whose class declares the DIMSE
status and the HTTP status; the incoming file is then removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pacsnode.core.errors import NonConformantDataset
from pacsnode.db.index import InstanceRecord
from pacsnode.scp.dataset import instance_record, read_header
from pacsnode.scp.indexer import GroupCommitIndexer, group_key
from pacsnode.scp.spool import Spool


@dataclass(frozen=True, slots=True)
class Origin:
    """Who sent the instance: a calling AE title and the peer's address.
    STOW-RS uses :data:`STOW_AE_TITLE` as its calling AE title."""

    calling_ae_title: str
    peer_host: str


@dataclass(frozen=True, slots=True)
class Expected:
    """What the sender announced (C-STORE's Affected SOP Class and Instance
    UIDs; STOW-RS to ``/studies/{study}``: the Study Instance UID). The data
    set must say the same."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None


# The calling AE title of instances that arrive by STOW-RS: it selects their
# completion policy (``peers``) and export rules (``calling_ae_titles``).
STOW_AE_TITLE = "DICOMWEB"


def _check(record: InstanceRecord, expected: Expected) -> None:
    if (
        expected.sop_instance_uid is not None
        and record.sop_instance_uid != expected.sop_instance_uid
    ):
        raise NonConformantDataset("SOPInstanceUID differs from AffectedSOPInstanceUID")
    if expected.sop_class_uid is not None and record.sop_class_uid != expected.sop_class_uid:
        raise NonConformantDataset("SOPClassUID differs from AffectedSOPClassUID")
    if (
        expected.study_instance_uid is not None
        and record.study_instance_uid != expected.study_instance_uid
    ):
        raise NonConformantDataset("StudyInstanceUID differs from the study in the request URL")


def prepare(
    received: Path,
    *,
    transfer_syntax_uid: str,
    origin: Origin,
    spool: Spool,
    expected: Expected = Expected(),
) -> InstanceRecord:
    """The durable half of ingesting: check, fsync and rename ``received``
    into the spool; return its index record (not yet committed). On a
    refusal the incoming file is removed and the error raised."""
    received_at = datetime.now(UTC)
    try:
        size = received.stat().st_size
        spool.check_space(size)
        header = read_header(received)
        record = instance_record(
            header,
            transfer_syntax_uid=transfer_syntax_uid,
            size_bytes=size,
            calling_ae_title=origin.calling_ae_title,
            peer_host=origin.peer_host,
            received_at=received_at,
        )
        _check(record, expected)
        spool.adopt(received, record.path)
    except BaseException:
        received.unlink(missing_ok=True)
        raise
    return record


def opens_group(record: InstanceRecord, indexer: GroupCommitIndexer, groups_sent: set[str]) -> bool:
    """Whether ``record`` is the first of its assembly group on this
    association (or STOW-RS request); notes its group as sent."""
    key = group_key(record, indexer.grouping(record))
    opens = key not in groups_sent
    groups_sent.add(key)
    return opens


def ingest(
    received: Path,
    *,
    transfer_syntax_uid: str,
    origin: Origin,
    spool: Spool,
    indexer: GroupCommitIndexer,
    groups_sent: set[str],
    expected: Expected = Expected(),
) -> InstanceRecord:
    """Make ``received`` durable and indexed; return its index record.

    ``groups_sent`` holds the assembly groups this association has already
    sent; the group of this instance is added to it. On a refusal the
    incoming file is removed and the error raised. (STOW-RS runs
    :func:`prepare` for its parts in parallel, then commits their records
    together with :meth:`GroupCommitIndexer.index_many`.)"""
    record = prepare(
        received, transfer_syntax_uid=transfer_syntax_uid, origin=origin, spool=spool,
        expected=expected,
    )  # fmt: skip
    key = group_key(record, indexer.grouping(record))
    indexer.index(record, opens=key not in groups_sent)
    groups_sent.add(key)  # once committed: a refused instance opened nothing
    return record
