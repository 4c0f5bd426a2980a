"""DIMSE statuses pacsnode answers with, and the one mapping from its errors.

Names and values follow PS3.4 Annex B.2.3 (Storage Service Class statuses),
PS3.4 Annex C.4 (Query/Retrieve statuses) and PS3.7 Annex C (general statuses).
Each :class:`PacsnodeError` declares its status (``dimse_status``, see
:mod:`pacsnode.core.errors`); :func:`dimse_status` and
:func:`qr_failure_status` read that declaration and decide, in the same
place, what any other exception means to a peer.
"""

from __future__ import annotations

from enum import IntEnum

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from pacsnode.core.errors import DimseStatus, PacsnodeError


class StoreStatus(IntEnum):
    SUCCESS = 0x0000
    # PS3.4 B.2.3: Refused, Out of Resources. The sender may retry later.
    OUT_OF_RESOURCES = 0xA700
    # PS3.4 B.2.3: Error, Data Set does not match SOP Class.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # PS3.4 B.2.3: Error, Cannot understand.
    CANNOT_UNDERSTAND = 0xC000
    # PS3.7 C.4.2: Failure, Processing failure (an unexpected error in pacsnode).
    PROCESSING_FAILURE = 0x0110
    # PS3.7 C.4.2: Refused, SOP Class not supported (STOW-RS only).
    SOP_CLASS_NOT_SUPPORTED = 0x0122


def store_status_text(code: int) -> str:
    """A Storage status in words: ``0xA700 Failure: Refused: Out of Resources``
    (PS3.4 B.2.3, as pynetdicom names them; PS3.18 reuses them as STOW-RS
    Failure and Warning Reasons)."""
    category, description = STORAGE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))
    return f"0x{code:04X} {category}" + (f": {description}" if description else "")


def dimse_status(exc: BaseException) -> StoreStatus:
    """The status a C-STORE answers when ingesting raised ``exc``: the
    error's declaration for a :class:`PacsnodeError`; Out of Resources for an
    ``OSError``; Processing failure for anything else."""
    if isinstance(exc, PacsnodeError):
        return StoreStatus(exc.dimse_status)
    if isinstance(exc, OSError):
        # Disk full, quota, I/O error: nothing was acknowledged, retry later.
        return StoreStatus.OUT_OF_RESOURCES
    return StoreStatus.PROCESSING_FAILURE


class RejectReason(tuple[int, int, int]):
    """(Result, Source, Reason/Diag.) of an A-ASSOCIATE-RJ, PS3.8 §9.3.4."""

    __slots__ = ()


# Permanent, by the DUL service user.
CALLING_AE_NOT_RECOGNIZED = RejectReason((0x01, 0x01, 0x03))
CALLED_AE_NOT_RECOGNIZED = RejectReason((0x01, 0x01, 0x07))
# Transient, by the DUL service provider (presentation related).
LOCAL_LIMIT_EXCEEDED = RejectReason((0x02, 0x03, 0x02))

# PS3.8 §9.3.4, Table 9-21: Result, Source and Reason/Diag. of A-ASSOCIATE-RJ.
_REJECT_SOURCES = {
    1: "DICOM UL service-user",
    2: "DICOM UL service-provider (ACSE related)",
    3: "DICOM UL service-provider (presentation related)",
}
_REJECT_REASONS: dict[tuple[int, int], str] = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def explain_reject(
    result: int | None, source: int | None, reason: int | None, calling_ae: str, called_ae: str
) -> str:
    """An A-ASSOCIATE-RJ (PS3.8 §9.3.4) in words, with what the requestor
    can do about it. ``calling_ae`` is our AE title, ``called_ae`` the one
    we asked for. Used by every SCU in pacsnode (echo, send, demo send), so
    the hint is the same wherever a refusal is met; an unknown code is
    shown as its number (a missing one as 0)."""
    result, source, reason = result or 0, source or 0, reason or 0
    words = _REJECT_REASONS.get((source, reason), f"reason {reason}")
    kind = "permanently" if result == 1 else "for now" if result == 2 else f"(result {result})"
    by = _REJECT_SOURCES.get(source, f"source {source}")
    text = f"association rejected {kind} by the {by}: {words}"
    if (source, reason) == (1, 3):
        hint = (
            f"the peer does not admit calling AE {calling_ae!r} from this machine; on pacsnode, "
            f"add it under `peers` with this machine's address in `hosts`, or pass "
            "--calling-ae with an AE title the peer admits"
        )
    elif (source, reason) == (1, 7):
        hint = (
            f"the peer's AE title is not {called_ae!r}: put its own AE title before the @ "
            "(for pacsnode: its `ae_title`, shown in `pacsnode config show`)"
        )
    elif result == 2:
        hint = "the peer is busy or at its association limit: try again later"
    else:
        return text
    return f"{text}. Hint: {hint}"


class QRStatus(IntEnum):
    """Query/Retrieve statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4).

    pynetdicom sends Success, the sub-operation Warning (0xB000) and
    Unable to perform sub-operations (0xA702) of C-MOVE/C-GET itself, from
    the C-STORE results it tracks."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    # C-FIND: a key the request wanted matched is not supported for matching.
    PENDING_WARNING = 0xFF01
    CANCEL = 0xFE00
    SUBOPERATIONS_WITH_FAILURES = 0xB000
    # C-FIND: Refused, Out of Resources.
    OUT_OF_RESOURCES = 0xA700
    # C-MOVE/C-GET: Refused, Out of Resources - unable to calculate number of matches.
    OUT_OF_RESOURCES_MATCHES = 0xA701
    # C-MOVE: Refused, Move Destination unknown.
    MOVE_DESTINATION_UNKNOWN = 0xA801
    # Error, Identifier does not match SOP Class.
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # Failed, Unable to process (an unexpected error in pacsnode).
    UNABLE_TO_PROCESS = 0xC000


def qr_failure_status(exc: BaseException, *, retrieve: bool) -> QRStatus:
    """The status a C-FIND (or, with ``retrieve``, a C-MOVE/C-GET) answers
    when matching raised ``exc``: the error's declaration for a
    :class:`PacsnodeError` (Out of Resources becomes A701 for a retrieve, PS3.4
    C.4.2.1.5; a status Q/R does not define becomes Unable to process); Out of
    Resources for an ``OSError`` (the index cannot be read now: the peer may
    retry later); Unable to process for anything else."""
    if isinstance(exc, PacsnodeError):
        declared = exc.dimse_status
    elif isinstance(exc, OSError):
        declared = DimseStatus.OUT_OF_RESOURCES
    else:
        return QRStatus.UNABLE_TO_PROCESS
    if declared == DimseStatus.OUT_OF_RESOURCES:
        return QRStatus.OUT_OF_RESOURCES_MATCHES if retrieve else QRStatus.OUT_OF_RESOURCES
    try:
        return QRStatus(declared.value)
    except ValueError:  # 0x0110 and 0x0122 are C-STORE statuses only
        return QRStatus.UNABLE_TO_PROCESS
