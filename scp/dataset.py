"""Reading what the index needs from a received data set, without decoding pixels."""

from __future__ import annotations

import re
from datetime import datetime
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from pacsnode.core.errors import InvalidDataset, NonConformantDataset
from pacsnode.db.index import InstanceRecord
from pacsnode.scp.spool import spool_relpath

# PS3.5 §9.1: components of digits without leading zeros, separated by '.',
# at most 64 characters. This is also what keeps a UID safe as a file name.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: str) -> bool:
    return len(value) <= 64 and _UID_RE.match(value) is not None


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or str(value).strip("\0 ") == "":
        raise NonConformantDataset(f"{keyword} is missing or empty (Type 1)")
    text = str(value).strip("\0 ")
    if not is_valid_uid(text):
        # Never echo the raw value: it is untrusted and could be anything.
        raise NonConformantDataset(f"{keyword} is not a valid UID (PS3.5 9.1)")
    return text


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip("\0 ")[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _past_header(tag: BaseTag, vr: str | None, length: int) -> bool:
    # Every attribute the index needs lies in groups 0008-0020.
    return tag.group > 0x0020


def read_header(source: bytes | Path) -> Dataset:
    """Parse the attributes the index needs from a Part 10 file or byte
    stream, stopping before group 0028: pixel data is never read here."""
    try:
        if isinstance(source, Path):
            with source.open("rb") as fp:
                return read_partial(fp, stop_when=_past_header)
        return read_partial(BytesIO(source), stop_when=_past_header)
    # Untrusted bytes: any parser failure (pydicom raises ValueError,
    # NotImplementedError for an unknown VR, BytesLengthException, ...; the
    # fuzzing in tests/test_hostile.py found several) means "cannot understand".
    except Exception as exc:
        raise InvalidDataset(f"the data set cannot be parsed: {type(exc).__name__}") from None


def instance_record(
    ds: Dataset,
    *,
    transfer_syntax_uid: str,
    size_bytes: int,
    calling_ae_title: str,
    peer_host: str,
    received_at: datetime,
) -> InstanceRecord:
    """Build the index record, checking the UIDs the node files instances by."""
    try:  # elements are decoded lazily: a corrupt one fails here, not in read_header
        study_uid = _uid(ds, "StudyInstanceUID")
        series_uid = _uid(ds, "SeriesInstanceUID")
        sop_uid = _uid(ds, "SOPInstanceUID")
        return InstanceRecord(
            patient_id=_text(ds, "PatientID", 64),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID", 64),
            patient_name=_text(ds, "PatientName", 324),
            patient_birth_date=_text(ds, "PatientBirthDate", 8),
            patient_sex=_text(ds, "PatientSex", 16),
            study_instance_uid=study_uid,
            study_date=_text(ds, "StudyDate", 8),
            study_time=_text(ds, "StudyTime", 16),
            accession_number=_text(ds, "AccessionNumber", 16),
            study_id=_text(ds, "StudyID", 16),
            study_description=_text(ds, "StudyDescription", 64),
            referring_physician_name=_text(ds, "ReferringPhysicianName", 324),
            series_instance_uid=series_uid,
            modality=_text(ds, "Modality", 16),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription", 64),
            body_part_examined=_text(ds, "BodyPartExamined", 16),
            frame_of_reference_uid=_text(ds, "FrameOfReferenceUID", 64),
            sop_instance_uid=sop_uid,
            sop_class_uid=_uid(ds, "SOPClassUID"),
            instance_number=_int(ds, "InstanceNumber"),
            transfer_syntax_uid=transfer_syntax_uid,
            size_bytes=size_bytes,
            path=spool_relpath(study_uid, series_uid, sop_uid),
            calling_ae_title=calling_ae_title,
            peer_host=peer_host,
            received_at=received_at,
        )
    except NonConformantDataset:
        raise
    except Exception as exc:
        # A value pydicom cannot convert (bad VR content, bad character set).
        raise InvalidDataset(f"an attribute cannot be decoded: {type(exc).__name__}") from None
