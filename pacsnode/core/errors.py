"""The one exception hierarchy of pacsnode, and each error's disposition.

Every error the node raises on purpose derives from :class:`PacsnodeError`
and declares once, as class attributes, what it means to each protocol:

``transient``
    True when the same work may succeed later (an outage, a full disk, an
    unreachable peer); False when repeating it on the same input gives the
    same error.
``dimse_status``
    The DIMSE failure status (:class:`DimseStatus`) a DICOM peer is answered
    with when this error ends its request.
``http_status``
    The HTTP status the admin API answers with (:class:`http.HTTPStatus`).

One function per protocol reads the declaration, and nothing else decides:
``pacsnode.scp.status.dimse_status`` / ``qr_failure_status`` (DICOM),
``pacsnode.workers.tasks.is_transient`` (the Celery retry decision) and
``pacsnode.api.errors.pacsnode_error_response`` (the one FastAPI exception
handler). Each of them also decides, in the same place, what a foreign
exception (``OSError``, a SQLAlchemy ``OperationalError``…) means to it.
``tests/test_errors.py`` checks that every class declares its disposition and
that the readers agree with it. The table is in
docs/architecture.md §6.

Messages name studies, series and instances by UID, never patients by name
or ID, so they can be logged, stored in job rows and sent to peers as they are.
"""

from __future__ import annotations

from enum import IntEnum
from http import HTTPStatus
from typing import ClassVar, Protocol


class DimseStatus(IntEnum):
    """The DIMSE failure statuses an error can declare.

    A code means the same in the Storage (PS3.4 B.2.3) and the Query/Retrieve
    (PS3.4 C.4) service classes; ``pacsnode.scp.status`` names each service's
    statuses (``StoreStatus``, ``QRStatus``) and turns these into them."""

    # Refused: Out of Resources. The peer may try again later.
    OUT_OF_RESOURCES = 0xA700
    # Error: Data Set (C-STORE) / Identifier (C-FIND, C-MOVE, C-GET) does not match SOP Class.
    DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # Error: Cannot understand (C-STORE) / Failed: Unable to process (Q/R).
    CANNOT_UNDERSTAND = 0xC000
    # PS3.7 C.4.2: Failure, Processing failure (a C-STORE that failed inside pacsnode).
    PROCESSING_FAILURE = 0x0110
    # PS3.7 C.4.2: Refused, SOP Class not supported (STOW-RS: an instance of a
    # class the node does not store; DIMSE refuses it at association negotiation).
    SOP_CLASS_NOT_SUPPORTED = 0x0122


class PacsnodeError(Exception):
    """Root of every error pacsnode raises deliberately.

    Its disposition is the one for "something inside pacsnode failed":
    permanent, Processing failure, 500. Every direct subclass declares its own.
    """

    transient: ClassVar[bool] = False
    dimse_status: ClassVar[DimseStatus] = DimseStatus.PROCESSING_FAILURE
    http_status: ClassVar[HTTPStatus] = HTTPStatus.INTERNAL_SERVER_ERROR


# -- configuration ----------------------------------------------------------------


class ConfigError(PacsnodeError):
    """The configuration is invalid; the message names the offending key."""

    transient = False
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.INTERNAL_SERVER_ERROR


class ModelConfigError(ConfigError):
    """A model manifest or its weights file is invalid (``models.registry``),
    or an administrator named a model that is not installed; the message names
    the manifest file and the key. Raised at start-up, so the node never runs
    a model it cannot vouch for; through the API a conflict with what is
    installed (409)."""

    http_status = HTTPStatus.CONFLICT


# -- receiving instances (C-STORE) --------------------------------------------------


class IngestError(PacsnodeError):
    """An instance offered by a peer could not be accepted."""

    transient = False
    dimse_status = DimseStatus.CANNOT_UNDERSTAND
    http_status = HTTPStatus.BAD_REQUEST


class InvalidDataset(IngestError):
    """The data set cannot be parsed (PS3.4 B.2.3 'Cannot understand')."""


class NonConformantDataset(IngestError):
    """The data set parses but lacks or misuses attributes the node needs.

    Examples: a missing Study Instance UID (Type 1 in every IOD), a UID that
    breaks the PS3.5 §9.1 grammar, a SOP Instance UID that differs from the
    request's Affected SOP Instance UID.
    """

    dimse_status = DimseStatus.DOES_NOT_MATCH_SOP_CLASS
    http_status = HTTPStatus.UNPROCESSABLE_ENTITY


class OutOfResources(IngestError):
    """The node cannot store or work now (disk watermark, index unavailable):
    "later" to a DICOM sender (0xA700), to a worker (the task is retried) and
    to an HTTP client (503)."""

    transient = True
    dimse_status = DimseStatus.OUT_OF_RESOURCES
    http_status = HTTPStatus.SERVICE_UNAVAILABLE


class IndexUnavailable(OutOfResources):
    """The database did not commit the index rows."""


class UnsupportedSopClass(IngestError):
    """An instance of a SOP Class the node does not store (STOW-RS; over
    DIMSE such a class is refused when the association is negotiated)."""

    dimse_status = DimseStatus.SOP_CLASS_NOT_SUPPORTED
    http_status = HTTPStatus.CONFLICT


# -- query/retrieve and the query layer ------------------------------------------------


class InvalidQuery(PacsnodeError):
    """The identifier of a C-FIND, C-MOVE or C-GET cannot be answered as sent
    (PS3.4 C.4.1.1.4: Identifier does not match SOP Class); ``keyword`` names
    the offending attribute when there is one."""

    transient = False
    dimse_status = DimseStatus.DOES_NOT_MATCH_SOP_CLASS
    http_status = HTTPStatus.BAD_REQUEST

    def __init__(self, message: str, keyword: str | None = None) -> None:
        super().__init__(message)
        self.keyword = keyword


class IndexQueryError(PacsnodeError):
    """The index could not be read (database unavailable): transient."""

    transient = True
    dimse_status = DimseStatus.OUT_OF_RESOURCES
    http_status = HTTPStatus.SERVICE_UNAVAILABLE


class NotFound(PacsnodeError):
    """The study, job or export named does not exist."""

    transient = False
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.NOT_FOUND


class StateConflict(PacsnodeError):
    """An action does not apply to a row in its present state, e.g. retrying a
    job that does not exist or has not failed."""

    transient = False
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.CONFLICT


class LeaseLost(PacsnodeError):
    """A worker's lease on a job ended before it finished: it stopped
    renewing in time, and the job went to another attempt. The worker drops
    its work and commits nothing more; the job is not failed."""

    transient = False
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.CONFLICT


class InvalidRequest(PacsnodeError):
    """Parameters that are each valid but contradict each other (a time range
    whose start is after its end)."""

    transient = False
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.UNPROCESSABLE_ENTITY


# -- DICOMweb (PS3.18) requests ------------------------------------------------------


class NotAcceptable(PacsnodeError):
    """No representation the client accepts can be served (PS3.18 §8.7: a
    media type or transfer syntax pacsnode does not produce for this resource)."""

    transient = False
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.NOT_ACCEPTABLE


class UnsupportedMediaType(PacsnodeError):
    """A STOW-RS request body that is not ``multipart/related;
    type="application/dicom"`` with a boundary."""

    transient = False
    dimse_status = DimseStatus.CANNOT_UNDERSTAND
    http_status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class MalformedBody(PacsnodeError):
    """A multipart body that breaks RFC 2046: no closing delimiter (truncated),
    a part without headers, headers too long. Nothing of it is stored."""

    transient = False
    dimse_status = DimseStatus.CANNOT_UNDERSTAND
    http_status = HTTPStatus.BAD_REQUEST


class BodyTooLarge(PacsnodeError):
    """A request body (or one part of it) past the configured limit
    (``dicomweb.max_request_mb``, ``dicomweb.max_part_mb``)."""

    transient = False
    dimse_status = DimseStatus.OUT_OF_RESOURCES
    http_status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


# -- the pipeline: preprocessing (series → volume → model input) ---------------------


class PreprocessError(PacsnodeError):
    """A series could not be turned into a model input. Permanent for the
    given input: re-running the job on the same files gives the same error."""

    transient = False
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.UNPROCESSABLE_ENTITY


class GeometryError(PreprocessError):
    """The instances do not form one regular, decodable 3-D volume.

    Raised for mixed series, inconsistent orientation, spacing or matrix size,
    missing geometry attributes, duplicate or missing slices, sheared stacks
    (gantry tilt) and undecodable pixel data.
    """


class PixelDataError(GeometryError):
    """A slice's pixel data cannot be decoded (names the SOP Instance UID and
    transfer syntax).

    Not a geometry problem in the strict sense, but it has the same consequence
    (the series cannot become a volume), so it subclasses :class:`GeometryError`
    and callers that catch that class catch this too.
    """


class CoregistrationError(PreprocessError):
    """Two series cannot share one grid: different Frames of Reference
    (PS3.3 C.7.4.1) and no registration between them, or no overlap."""


# -- the pipeline: models, fusion, encoding --------------------------------------------


class ModelLoadError(PacsnodeError):
    """A model file is missing, unreadable, of another architecture, or its
    SHA-256 differs from the manifest's. Permanent: never retried."""

    transient = False
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.INTERNAL_SERVER_ERROR


class ModelInputError(PacsnodeError):
    """An input array does not have the shape the model accepts. Permanent."""

    transient = False
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.INTERNAL_SERVER_ERROR


class FusionError(PacsnodeError):
    """A fusion model could not combine the series of a study. Permanent: the
    job fails with the reason after the other models' results were written."""

    transient = False
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.UNPROCESSABLE_ENTITY


class EncodeError(PacsnodeError):
    """Results that cannot become DICOM objects: a model no longer installed,
    a mask that does not fit its series. Permanent: never retried."""

    transient = False
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.INTERNAL_SERVER_ERROR


# -- outgoing associations ---------------------------------------------------------------


class Peer(Protocol):
    """The other end of an outgoing association (:class:`pacsnode.scp.scu.Peer`)."""

    @property
    def ae_title(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class ScuError(PacsnodeError):
    """An outgoing DICOM operation failed: no association (unreachable,
    rejected: :mod:`pacsnode.scp.scu` subclasses carry the A-ASSOCIATE-RJ
    result, source and reason), or no Success for a C-ECHO. The message names
    the peer. The peer may accept later."""

    transient = True
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.BAD_GATEWAY


# PS3.8 Table 9-21 (A-ASSOCIATE-RJ PDU fields), in words.
RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}
SOURCES = {
    1: "DICOM UL service-user",
    2: "DICOM UL service-provider (ACSE related function)",
    3: "DICOM UL service-provider (presentation related function)",
}


class NoAssociation(ScuError):
    """No association: unreachable, aborted during negotiation, or no answer.
    ``connected`` tells whether the TCP (and TLS) connection was made."""

    def __init__(self, message: str, *, peer: Peer, connected: bool) -> None:
        super().__init__(message)
        self.peer = peer
        self.connected = connected


class AssociationRejected(ScuError):
    """The peer answered A-ASSOCIATE-RJ. ``result`` (1 permanent, 2
    transient), ``source`` (1 service-user, 2 ACSE, 3 presentation) and
    ``reason`` (the Diagnostic) as in PS3.8 Table 9-21, with their words."""

    def __init__(self, peer: Peer, result: int, source: int, reason: int, reason_text: str):
        self.peer = peer
        self.result, self.source, self.reason = result, source, reason
        self.result_text = RESULTS.get(result, f"result {result}")
        self.source_text = SOURCES.get(source, f"source {source}")
        self.reason_text = reason_text
        super().__init__(
            f"association rejected by {peer} ({self.result_text}; source: "
            f"{self.source_text}; reason: {reason_text})"
        )

    @property
    def permanent(self) -> bool:
        """The peer said the rejection is permanent (PS3.8 Table 9-21,
        result 1): a configuration problem on one side, not a busy peer. The
        class's disposition stays transient: exports keep their durable,
        bounded backoff either way."""
        return self.result == 1


# -- STOW-RS to DICOMweb destinations ------------------------------------------------------


class StowError(PacsnodeError):
    """A STOW-RS request (PS3.18 §10.5) to a DICOMweb destination did not
    store what was sent. The message names the destination's URL (never its
    credentials) and the HTTP status or the instance's FailureReason."""

    transient = True
    dimse_status = DimseStatus.PROCESSING_FAILURE
    http_status = HTTPStatus.BAD_GATEWAY


class StowUnavailable(StowError):
    """The destination cannot take it now: no connection, a timeout, HTTP
    408, 429 or 5xx, or an instance refused for lack of resources (0xA7xx).
    The export is retried with its backoff until its deadline."""


class StowRejected(StowError):
    """The destination refused for good: HTTP 4xx (wrong credentials, no
    permission, a malformed request) or an instance refused with a
    FailureReason such as 0xA9xx or 0xC000. Repeating the same request gives
    the same answer, so the export fails at once with the reason; an operator
    fixes the cause and retries it (``pacsnode exports retry``)."""

    transient = False
