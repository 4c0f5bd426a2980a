"""WADO-RS (PS3.18 §10.4): studies, series and instances as
``multipart/related; type="application/dicom"``, their metadata (DICOM
JSON with BulkDataURIs), bulk data and frames.

Responses stream: the body is a generator over the stored files, read in
chunks (:mod:`.multipart`); an instance that must be transcoded is decoded
alone, so memory grows by one instance, never by a study.

Accept negotiation (PS3.18 §8.7.3): ``transfer-syntax=*`` sends each
instance as stored; without a transfer syntax the default is Explicit VR
Little Endian; Explicit or Implicit VR Little Endian are produced from any
syntax whose pixel data pacsnode decodes. A request pacsnode cannot answer
in an accepted form is refused with 406 before anything is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRBigEndian, ImplicitVRLittleEndian

from pacsnode.api.deps import EngineDep, ReadDep, SettingsDep
from pacsnode.api.dicomweb.common import (
    ANY,
    DICOM,
    DICOM_JSON,
    OCTET_STREAM,
    UNCOMPRESSED,
    base_url,
    can_transcode,
    instance_url,
    locate,
    negotiate,
    record,
    spool_path,
)
from pacsnode.api.dicomweb.dicomjson import bulk_value, metadata_json, read_metadata
from pacsnode.api.dicomweb.multipart import content_type, file_chunks, new_boundary, stream_parts
from pacsnode.core.errors import InvalidDataset, InvalidQuery, NotAcceptable, NotFound
from pacsnode.db.qr import StoredInstance

log = logging.getLogger(__name__)
router = APIRouter(tags=["dicomweb"])

# What each resource offers besides transfer-syntax=* (for the conformance statement).
INSTANCE_TRANSFER_SYNTAXES = tuple(str(uid) for uid in UNCOMPRESSED)
FRAME_TRANSFER_SYNTAXES = (str(UNCOMPRESSED[0]),)
ANY_NATIVE = str(UNCOMPRESSED[0])


def transcode(path: Path, target: str) -> bytes:
    """One stored instance re-encoded in an uncompressed ``target`` syntax;
    NotAcceptable when its pixel data cannot be decoded."""
    try:
        ds = dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            # Decoded to native pixels; the SOP Instance UID is kept (PS3.18 §8.7.3.5.3).
            ds.decompress(generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = UID(target)
        out = BytesIO()
        ds.save_as(
            out, implicit_vr=target == ImplicitVRLittleEndian, little_endian=True,
            enforce_file_format=True,
        )  # fmt: skip
    except Exception as exc:
        raise NotAcceptable(
            f"an instance cannot be converted to {target} ({type(exc).__name__}): "
            "ask for transfer-syntax=*"
        ) from None
    return out.getvalue()


def _check(found: list[StoredInstance], target: str) -> None:
    refused = [s for s in found if not can_transcode(s.transfer_syntax_uid, target)]
    if refused:
        raise NotAcceptable(
            f"{len(refused)} instance(s) are stored in {refused[0].transfer_syntax_uid}, which "
            f"this node cannot convert to {target}: ask for transfer-syntax=*"
        )


def _instances_response(request: Request, settings: Any, found: list[StoredInstance]) -> Response:
    target = negotiate(request.headers.get("accept"), DICOM, INSTANCE_TRANSFER_SYNTAXES)
    syntax = target.transfer_syntax
    _check(found, syntax)
    boundary = new_boundary()
    base = base_url(request)
    # One instance is converted before the answer starts, so a failure is a 406.
    # In a study or series, a conversion that fails mid-stream ends the
    # response without its closing boundary: the client sees an incomplete
    # body, never a complete-looking one that lacks an instance.
    first = None
    if len(found) == 1 and syntax not in (ANY, found[0].transfer_syntax_uid):
        first = transcode(spool_path(settings, found[0]), syntax)

    def parts() -> Iterator[tuple[str, str | None, Any]]:
        for stored in found:
            path = spool_path(settings, stored)
            location = instance_url(
                base, stored.study_instance_uid, stored.series_instance_uid,
                stored.sop_instance_uid,
            )  # fmt: skip
            if syntax in (ANY, stored.transfer_syntax_uid):
                chunks: Any = file_chunks(path)
                sent = stored.transfer_syntax_uid
            else:
                try:
                    chunks = [first if first is not None else transcode(path, syntax)]
                except NotAcceptable:
                    log.warning(
                        "WADO-RS: instance %s cannot be converted to %s; response cut short",
                        stored.sop_instance_uid, syntax,
                    )  # fmt: skip
                    raise
                sent = syntax
            yield f"{DICOM}; transfer-syntax={sent}", location, chunks

    media = content_type(boundary, DICOM, None if syntax == ANY else syntax)
    return StreamingResponse(stream_parts(boundary, parts()), media_type=media)


def _retrieve(
    request: Request,
    principal: Any,
    settings: Any,
    engine: Any,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> Response:
    found = locate(engine, study, series, instance)
    response = _instances_response(request, settings, found)
    record(engine, principal, request, "dicomweb.retrieve", study, instances=len(found))
    return response


@router.get("/studies/{study}", response_class=Response, summary="WADO-RS: retrieve a study")
def retrieve_study(
    request: Request, principal: ReadDep, settings: SettingsDep, engine: EngineDep, study: str
) -> Response:
    return _retrieve(request, principal, settings, engine, study)


@router.get(
    "/studies/{study}/series/{series}",
    response_class=Response,
    summary="WADO-RS: retrieve a series",
)
def retrieve_series(
    request: Request,
    principal: ReadDep,
    settings: SettingsDep,
    engine: EngineDep,
    study: str,
    series: str,
) -> Response:
    return _retrieve(request, principal, settings, engine, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}",
    response_class=Response,
    summary="WADO-RS: retrieve an instance",
)
def retrieve_instance(
    request: Request,
    principal: ReadDep,
    settings: SettingsDep,
    engine: EngineDep,
    study: str,
    series: str,
    instance: str,
) -> Response:
    return _retrieve(request, principal, settings, engine, study, series, instance)


def _metadata(
    request: Request,
    principal: Any,
    settings: Any,
    engine: Any,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> Response:
    for rng_type in ("application/dicom+json", "application/json", "*/*", "application/*"):
        if rng_type in (request.headers.get("accept") or "*/*"):
            break
    else:
        raise NotAcceptable("metadata is served as application/dicom+json")
    found = locate(engine, study, series, instance)
    base = base_url(request)

    def body() -> Iterator[bytes]:
        import json

        yield b"["
        for n, stored in enumerate(found):
            url = instance_url(
                base, stored.study_instance_uid, stored.series_instance_uid,
                stored.sop_instance_uid,
            )  # fmt: skip
            ds = read_metadata(spool_path(settings, stored))
            item = metadata_json(ds, f"{url}/bulkdata", stored.transfer_syntax_uid)
            yield (b"," if n else b"") + json.dumps(item, separators=(",", ":")).encode()
        yield b"]"

    record(engine, principal, request, "dicomweb.metadata", study, instances=len(found))
    return StreamingResponse(body(), media_type=DICOM_JSON)


@router.get("/studies/{study}/metadata", summary="WADO-RS: metadata of a study")
def study_metadata(
    request: Request, principal: ReadDep, settings: SettingsDep, engine: EngineDep, study: str
) -> Response:
    return _metadata(request, principal, settings, engine, study)


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: metadata of a series")
def series_metadata(
    request: Request,
    principal: ReadDep,
    settings: SettingsDep,
    engine: EngineDep,
    study: str,
    series: str,
) -> Response:
    return _metadata(request, principal, settings, engine, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="WADO-RS: metadata of an instance",
)
def instance_metadata(
    request: Request,
    principal: ReadDep,
    settings: SettingsDep,
    engine: EngineDep,
    study: str,
    series: str,
    instance: str,
) -> Response:
    return _metadata(request, principal, settings, engine, study, series, instance)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}",
    response_class=Response,
    summary="WADO-RS: a bulk data value of an instance",
)
def bulkdata(
    request: Request,
    principal: ReadDep,
    settings: SettingsDep,
    engine: EngineDep,
    study: str,
    series: str,
    instance: str,
    tag: str,
) -> Response:
    negotiate(request.headers.get("accept"), OCTET_STREAM, ())
    if len(tag) != 8 or any(c not in "0123456789abcdefABCDEF" for c in tag):
        raise InvalidQuery("a bulk data tag is 8 hexadecimal digits, e.g. 7FE00010")
    stored = locate(engine, study, series, instance)[0]
    value = bulk_value(spool_path(settings, stored), Tag(int(tag, 16)))
    if value is None:
        raise NotFound(f"the instance has no bulk data value {tag.upper()}")
    boundary = new_boundary()
    record(engine, principal, request, "dicomweb.bulkdata", study, tag=tag.upper())
    body = stream_parts(boundary, [(OCTET_STREAM, None, [value])])
    return StreamingResponse(body, media_type=content_type(boundary, OCTET_STREAM))


def frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidQuery("frames are a comma-separated list of numbers from 1") from None
    if not numbers or any(n < 1 for n in numbers) or len(numbers) > 10_000:
        raise InvalidQuery("frames are a comma-separated list of numbers from 1")
    return numbers


def _frame_length(ds: Dataset) -> int:
    samples = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
    return samples * int(ds.BitsAllocated) // 8


def read_frames(path: Path, numbers: list[int], stored_syntax: str, as_stored: bool) -> list[bytes]:
    """The requested frames: as stored (``as_stored``) or uncompressed,
    little endian. NotFound for a frame the instance does not have."""
    try:
        ds = dcmread(path)
    except Exception as exc:
        raise InvalidDataset(f"a stored instance cannot be read: {type(exc).__name__}") from None
    if "PixelData" not in ds:
        raise NotFound("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames") or 1)
    if max(numbers) > count:
        raise NotFound(f"the instance has {count} frame(s)")
    syntax = UID(stored_syntax)
    if syntax.is_compressed and as_stored:
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [frames[n - 1] for n in numbers]
    one_bit = int(ds.get("BitsAllocated", 8)) == 1  # frames may not start on a byte
    if not syntax.is_compressed and syntax != ExplicitVRBigEndian and not one_bit:
        length = _frame_length(ds)
        data = ds.PixelData
        return [data[(n - 1) * length : n * length] for n in numbers]
    from pydicom.pixels import pack_bits, pixel_array

    out = []
    for n in numbers:
        try:
            array = pixel_array(ds, index=n - 1)
        except Exception as exc:
            raise NotAcceptable(
                f"the pixel data cannot be decoded ({type(exc).__name__}): "
                "ask for transfer-syntax=*"
            ) from None
        if one_bit:  # a segmentation's frame, packed as in Pixel Data (PS3.5 8.1.1)
            out.append(pack_bits(array, pad=False))
        else:
            out.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return out


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    response_class=Response,
    summary="WADO-RS: frames of an instance",
)
def retrieve_frames(
    request: Request,
    principal: ReadDep,
    settings: SettingsDep,
    engine: EngineDep,
    study: str,
    series: str,
    instance: str,
    frames: str,
) -> Response:
    numbers = frame_numbers(frames)
    target = negotiate(request.headers.get("accept"), OCTET_STREAM, FRAME_TRANSFER_SYNTAXES)
    stored = locate(engine, study, series, instance)[0]
    as_stored = target.transfer_syntax == ANY
    # Big endian frames are decoded and sent little endian (read_frames).
    syntax = stored.transfer_syntax_uid
    if not (as_stored or syntax == ExplicitVRBigEndian or can_transcode(syntax, ANY_NATIVE)):
        raise NotAcceptable(
            f"the instance is stored in {syntax}, which this node "
            "cannot decode: ask for transfer-syntax=*"
        )
    values = read_frames(
        spool_path(settings, stored), numbers, stored.transfer_syntax_uid, as_stored
    )
    sent = stored.transfer_syntax_uid if as_stored else target.transfer_syntax
    boundary = new_boundary()
    record(engine, principal, request, "dicomweb.frames", study, frames=len(numbers))
    part = f"{OCTET_STREAM}; transfer-syntax={sent}"
    body = stream_parts(boundary, [(part, None, [value]) for value in values])
    return StreamingResponse(body, media_type=content_type(boundary, OCTET_STREAM, sent))
