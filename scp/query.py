"""C-FIND SCP (PS3.4 C.4.1): Patient Root and Study Root, every level.

The identifier is read from its raw bytes, not through pydicom's value
conversion, so a key is matched exactly as sent: ``SeriesNumber`` ``*`` or a
time range would not survive conversion to IS or TM, and a backslash-separated
list keeps its values. Text VRs that depend on the character set (PN, LO, SH,
...) are decoded with the identifier's Specific Character Set.
:mod:`db.qr` checks the request and builds the SQL; this module turns rows
into response identifiers.

A response carries QueryRetrieveLevel, RetrieveAETitle (this node; PS3.4
C.4.1.1.3.2), the requested keys and the unique keys of the query level and
the levels above. A requested key the index does not hold comes back empty;
if the request wanted it matched, each response has the status 0xFF01
(Pending, optional keys not supported) instead of 0xFF00. Specific Character
Set is returned when the request had one (its value echoed), or as ISO_IR 192
whenever a returned value is not ASCII.

All matches are read in one short transaction, then sent; a C-CANCEL is
checked before each response (0xFE00). Log lines name keywords, levels, AE
titles and counts, never values: keys may hold patient names and IDs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import Engine

from pacsnode.core.errors import InvalidQuery
from pacsnode.db.qr import InformationModel, Query, find, find_query
from pacsnode.scp.status import QRStatus, qr_failure_status

log = logging.getLogger(__name__)

FIND_MODELS: dict[str, InformationModel] = {
    str(PatientRootQueryRetrieveInformationModelFind): InformationModel.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelFind): InformationModel.STUDY_ROOT,
}

_SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
_QUERY_RETRIEVE_LEVEL = Tag(0x0008, 0x0052)
_RETRIEVE_AE_TITLE = Tag(0x0008, 0x0054)
_UTF8 = "ISO_IR 192"

FindResponse = tuple[int | Dataset, Dataset | None]


@dataclass
class Request:
    """A decoded identifier: the level, ``{keyword: values}`` (``()`` for
    universal matching) and the (tag, VR) of every public key requested."""

    level: str | None
    keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tags: dict[str, tuple[BaseTag, str]] = field(default_factory=dict)
    character_set: list[str] | None = None


def _ascii(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _values(ds: Dataset, tag: BaseTag, vr: str) -> tuple[str, ...]:
    """The key's values as sent, split at backslashes, padding removed;
    ``()`` when empty."""
    if vr in CUSTOMIZABLE_CHARSET_VR:
        value = ds[tag].value  # decoded with the identifier's character set
        items = list(value) if isinstance(value, MultiValue | list) else [value]
        parts = [str(v) for v in items if v is not None]
        parts = [p for text in parts for p in text.split("\\")]
    else:
        element = ds.get_item(tag)
        raw = element.value if isinstance(element, RawDataElement) else ds[tag].value
        parts = _ascii(raw).split("\\")
    cleaned = tuple(p.strip(" \0") for p in parts)
    return tuple(p for p in cleaned if p)


def read_identifier(ds: Dataset) -> Request:
    """Decode a C-FIND/C-MOVE/C-GET identifier; InvalidQuery if it cannot be."""
    try:
        level_element = ds.get_item(_QUERY_RETRIEVE_LEVEL)
        level = None
        if level_element is not None:
            level = _ascii(level_element.value).strip(" \0") or None
        request = Request(level)
        charset = ds.get_item(_SPECIFIC_CHARACTER_SET)
        if charset is not None and charset.value:
            request.character_set = [v.strip(" \0") for v in _ascii(charset.value).split("\\")]
        for tag in list(ds.keys()):
            tag = Tag(tag)
            if (
                tag.element == 0
                or tag.is_private
                or tag
                in (
                    _QUERY_RETRIEVE_LEVEL,
                    _SPECIFIC_CHARACTER_SET,
                    _RETRIEVE_AE_TITLE,
                )
            ):
                continue
            keyword = keyword_for_tag(tag)
            if not keyword:
                continue  # not in the dictionary: neither matched nor returned
            element = ds.get_item(tag)
            vr = str(getattr(element, "VR", None) or dictionary_VR(tag)).split(" or ")[0]
            request.tags[keyword] = (tag, vr)
            request.keys[keyword] = () if vr == "SQ" else _values(ds, tag, vr)
    except InvalidQuery:
        raise
    except Exception as exc:
        raise InvalidQuery(f"the identifier cannot be decoded ({type(exc).__name__})") from None
    return request


def _dicom_value(value: Any) -> Any:
    if value is None or value == "":
        return None
    return value


def _non_ascii(value: Any) -> bool:
    if isinstance(value, str):
        return not value.isascii()
    if isinstance(value, list):
        return any(_non_ascii(v) for v in value)
    return False


def response_identifier(
    request: Request, query: Query, row: dict[str, Any], ae_title: str
) -> Dataset:
    """The identifier of one Pending response (PS3.4 C.4.1.1.3.2)."""
    ds = Dataset()
    values = {keyword: row.get(keyword) for keyword in query.returned}
    if any(_non_ascii(v) for v in values.values()):
        ds.SpecificCharacterSet = _UTF8
    elif request.character_set:
        ds.SpecificCharacterSet = request.character_set
    ds.QueryRetrieveLevel = query.level.name
    ds.RetrieveAETitle = ae_title
    for keyword, value in values.items():
        setattr(ds, keyword, _dicom_value(value))
    for keyword in query.unsupported:
        tag, vr = request.tags[keyword]
        ds.add_new(tag, vr, [] if vr == "SQ" else None)
    return ds


def failure(exc: BaseException, *, retrieve: bool) -> Dataset:
    """A failure status data set with an ErrorComment (and the offending
    element for an invalid identifier)."""
    status = qr_failure_status(exc, retrieve=retrieve)
    rsp = Dataset()
    rsp.Status = int(status)
    if isinstance(exc, InvalidQuery):
        comment = str(exc)
        if exc.keyword:
            rsp.OffendingElement = [Tag(exc.keyword)]
    elif status in (QRStatus.OUT_OF_RESOURCES, QRStatus.OUT_OF_RESOURCES_MATCHES):
        comment = "the index is unavailable, retry later"
    else:
        comment = "internal error, see the pacsnode log"
    rsp.ErrorComment = comment[:64]  # LO (PS3.7 C.4)
    return rsp


def handle_find(event: Event, engine: Engine, ae_title: str) -> Iterator[FindResponse]:
    """C-FIND: one Pending response per match, then pynetdicom's Success."""
    calling = event.assoc.requestor.ae_title
    model = FIND_MODELS[str(event.request.AffectedSOPClassUID)]
    try:
        request = read_identifier(event.identifier)
        query = find_query(model, request.level, request.keys)
        rows = find(engine, query)
    except Exception as exc:
        rsp = failure(exc, retrieve=False)
        log.warning(
            "C-FIND (%s) from %s refused with 0x%04X: %s",
            model.value,
            calling,
            rsp.Status,
            str(exc) if isinstance(exc, InvalidQuery) else type(exc).__name__,
        )
        yield rsp, None
        return
    log.info(
        "C-FIND (%s) %s level from %s: %d match(es) on %s",
        model.value,
        query.level.name,
        calling,
        len(rows),
        ", ".join(query.matching) or "no keys",
    )
    pending = QRStatus.PENDING_WARNING if query.ignored else QRStatus.PENDING
    for sent, row in enumerate(rows):
        if event.is_cancelled:
            log.info("C-FIND from %s cancelled after %d response(s)", calling, sent)
            yield int(QRStatus.CANCEL), None
            return
        yield int(pending), response_identifier(request, query, row, ae_title)
