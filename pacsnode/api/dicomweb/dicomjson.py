"""The DICOM JSON Model (PS3.18 Annex F) of stored instances and of query
matches, with pydicom's ``to_json_dict``.

An instance's metadata is read with large values deferred: a value longer
than :data:`BULK_THRESHOLD` bytes of a binary VR (Pixel Data above all) is
never read, and its element carries a ``BulkDataURI`` to the instance's
``bulkdata`` resource instead. Binary values inside sequences are small in
practice and stay inline (``InlineBinary``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import BYTES_VR

from pacsnode.core.errors import InvalidDataset

BULK_THRESHOLD = 1024
_AVAILABLE_TRANSFER_SYNTAX = "00083002"


def tag_key(tag: BaseTag) -> str:
    return f"{tag.group:04X}{tag.element:04X}"


def _vr(ds: Dataset, raw: RawDataElement) -> str:
    if raw.VR:
        return str(raw.VR)
    vr = str(dictionary_VR(raw.tag))
    if " or " in vr:  # implicit VR: OW for pixel data, else the first choice
        return "OW" if "OW" in vr else vr.split(" or ")[0]
    return vr


def _fix_vr(element: DataElement, ds: Dataset) -> DataElement:
    if " or " in element.VR:
        with contextlib.suppress(Exception):  # leaves the VR ambiguous: fixed below
            correct_ambiguous_vr_element(element, ds, True)
        if " or " in element.VR:
            element.VR = element.VR.split(" or ")[0]
    return element


def read_metadata(path: Path) -> Dataset:
    """The stored instance's data set with binary values longer than
    :data:`BULK_THRESHOLD` deferred (read only if accessed)."""
    try:
        return dcmread(path, defer_size=BULK_THRESHOLD)
    except Exception as exc:  # a file on disk that no longer parses
        raise InvalidDataset(f"a stored instance cannot be read: {type(exc).__name__}") from None


def metadata_json(ds: Dataset, bulk_url: str, transfer_syntax: str) -> dict[str, Any]:
    """The instance's DICOM JSON; deferred binary values become
    ``{bulk_url}/{tag}`` BulkDataURIs."""
    out: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        tag = Tag(tag)
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            vr = _vr(ds, raw)
            if vr in BYTES_VR or vr in ("OB", "OW"):
                out[tag_key(tag)] = {"vr": vr, "BulkDataURI": f"{bulk_url}/{tag_key(tag)}"}
                continue
        element = _fix_vr(ds[tag], ds)
        out[tag_key(tag)] = element.to_json_dict(None, BULK_THRESHOLD)
    out[_AVAILABLE_TRANSFER_SYNTAX] = {"vr": "UI", "Value": [transfer_syntax]}
    return out


def bulk_value(path: Path, tag: BaseTag) -> bytes | None:
    """The value of one top-level element of a stored instance, or None."""
    ds = read_metadata(path)
    if tag not in ds:
        return None
    value = ds[tag].value
    return value if isinstance(value, bytes) else None


def dataset_json(ds: Dataset) -> dict[str, Any]:
    """A small data set built by pacsnode (a query match, a STOW-RS answer)."""
    return ds.to_json_dict(BULK_THRESHOLD, None)
