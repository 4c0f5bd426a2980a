"""STOW-RS (PS3.18 §10.5): ``POST /studies`` and ``/studies/{study}`` with
``multipart/related; type="application/dicom"``.

The body is parsed as it arrives (:class:`.multipart.MultipartReader`); each
part streams into a file in the spool's incoming folder, so a request is
never held in memory, and a part, like the whole body, is bounded
(``dicomweb.max_part_mb``, ``dicomweb.max_request_mb``). Only once the body
has ended with its closing delimiter are the parts ingested, one by one, by
the function C-STORE uses (:func:`scp.ingest.ingest`): disk watermark,
header parse, UID checks, fsync and rename into the spool, index commit. A
body that is truncated, malformed or too large is refused whole (4xx) and
nothing of it is stored.

The answer is PS3.18's: 200 when every instance was stored, 202 when some
were refused, 409 when all were; a DICOM JSON body with
ReferencedSOPSequence and FailedSOPSequence (each refused instance with its
FailureReason, the C-STORE status its refusal declares), and a ``Warning``
header per refusal with the reason in words. The stored studies then go
through study assembly as after an association's release.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts
from starlette.requests import ClientDisconnect

from pacsnode.api.deps import EngineDep, SettingsDep, StoreDep, client_address
from pacsnode.api.dicomweb.common import (
    DICOM,
    DICOM_JSON,
    base_url,
    instance_url,
    record,
    study_url,
)
from pacsnode.api.dicomweb.dicomjson import dataset_json
from pacsnode.api.dicomweb.multipart import (
    MultipartReader,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
)
from pacsnode.core.errors import (
    BodyTooLarge,
    InvalidDataset,
    MalformedBody,
    UnsupportedMediaType,
    UnsupportedSopClass,
)
from pacsnode.core.settings import Settings
from pacsnode.db.index import InstanceRecord
from pacsnode.scp.dataset import is_valid_uid
from pacsnode.scp.indexer import GroupCommitIndexer
from pacsnode.scp.ingest import STOW_AE_TITLE, Expected, Origin, opens_group, prepare
from pacsnode.scp.spool import Spool
from pacsnode.scp.status import dimse_status

log = logging.getLogger(__name__)
router = APIRouter(tags=["dicomweb"])

STORAGE_SOP_CLASSES = frozenset(str(c.abstract_syntax) for c in StoragePresentationContexts)
TRANSFER_SYNTAXES = frozenset(str(uid) for uid in ALL_TRANSFER_SYNTAXES)
REQUEST_TYPES = (DICOM,)
INGEST_THREADS = 8
MAX_PARTS = 100_000  # instances in one request: their bookkeeping is in memory
_MAX_WARNINGS = 20


class Backend:
    """The spool and the group-commit index writer of this API process,
    created by the first STOW-RS request."""

    _lock = threading.Lock()

    def __init__(self, settings: Settings, engine: Any) -> None:
        self.spool = Spool(settings.spool_dir, settings.min_free_disk_mb * 2**20)
        self.indexer = GroupCommitIndexer(
            engine, grouping_for=lambda ae_title: settings.completion_for(ae_title).grouping
        )

    @classmethod
    def of(cls, request: Request) -> Backend:
        state = request.app.state
        with cls._lock:
            if getattr(state, "stow", None) is None:
                state.stow = cls(state.settings, state.engine)
        backend: Backend = state.stow
        return backend


@dataclass
class Part:
    """One received part: its file in the incoming folder, or why it was refused."""

    number: int
    path: Path | None = None
    size: int = 0
    refused: Exception | None = None
    uids: tuple[str, str] = ("", "")  # SOP Class and Instance, when readable and valid


@dataclass
class Outcome:
    stored: list[InstanceRecord] = field(default_factory=list)
    failed: list[tuple[Part, BaseException]] = field(default_factory=list)


def _check_content_type(value: str | None) -> str:
    media, params = boundary_of(value or "")
    if media != "multipart/related":
        raise UnsupportedMediaType(
            f'STOW-RS takes multipart/related; type="{DICOM}", not {media or "no Content-Type"}'
        )
    part_type = params.get("type", DICOM).lower()
    if part_type not in REQUEST_TYPES:
        raise UnsupportedMediaType(
            f'STOW-RS here takes parts of type "{DICOM}" only, not "{part_type}"'
        )
    boundary = params.get("boundary", "")
    if not boundary:
        raise MalformedBody("the Content-Type has no boundary parameter")
    return boundary


async def receive(request: Request, spool: Spool, settings: Settings) -> list[Part]:
    """Stream the body's parts into incoming files; refuse the whole body
    when it is malformed, truncated or too large (removing every file)."""
    limits = settings.dicomweb
    max_total, max_part = limits.max_request_mb * 2**20, limits.max_part_mb * 2**20
    boundary = _check_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_total):
        raise BodyTooLarge(
            f"the declared body size exceeds dicomweb.max_request_mb ({limits.max_request_mb} MiB)"
        )
    reader = MultipartReader(boundary)
    parts: list[Part] = []
    current: Part | None = None
    sink: IO[bytes] | None = None
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_total:
                raise BodyTooLarge(
                    f"the body exceeds dicomweb.max_request_mb ({limits.max_request_mb} MiB)"
                )
            for event in reader.feed(chunk):
                if isinstance(event, PartStart):
                    if len(parts) >= MAX_PARTS:
                        raise MalformedBody(f"more than {MAX_PARTS} parts in one request")
                    current = Part(len(parts) + 1)
                    parts.append(current)
                    part_type = event.headers.get("content-type", DICOM)
                    media, _ = boundary_of(part_type)
                    if media != DICOM:
                        shown = media if media.isascii() and media.isprintable() else "?"
                        current.refused = InvalidDataset(f"the part is {shown[:64]}, not {DICOM}")
                        continue
                    incoming = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed at PartEnd)
                        dir=spool.incoming, prefix="stow-", delete=False
                    )
                    current.path = Path(incoming.name)
                    sink = incoming
                elif isinstance(event, PartData) and current is not None:
                    current.size += len(event.data)
                    if sink is not None and current.size > max_part:
                        current.refused = BodyTooLarge(
                            f"the instance exceeds dicomweb.max_part_mb ({limits.max_part_mb} MiB)"
                        )
                        sink.close()
                        sink = None
                        _remove(current)
                    elif sink is not None:
                        sink.write(event.data)
                elif isinstance(event, PartEnd):
                    if sink is not None:
                        sink.close()
                        sink = None
                    current = None
            if reader.done:
                break
        reader.finish()
        if not parts:
            raise MalformedBody("the multipart body has no parts")
    except BaseException as exc:
        if sink is not None:
            sink.close()
        for part in parts:
            _remove(part)
        if isinstance(exc, ClientDisconnect):
            raise MalformedBody("the client closed the connection before the body ended") from None
        raise
    return parts


def _remove(part: Part) -> None:
    if part.path is not None:
        part.path.unlink(missing_ok=True)
        part.path = None


def _uids(path: Path | None) -> tuple[str, str]:
    """(SOP Class, SOP Instance) UIDs from the part's File Meta, if readable
    and well-formed; ``("", "")`` otherwise (an untrusted value is never echoed)."""
    if path is None:
        return "", ""
    try:
        meta = read_file_meta_info(path)
        pair = (
            str(meta.get("MediaStorageSOPClassUID", "")),
            str(meta.get("MediaStorageSOPInstanceUID", "")),
        )
    except Exception:
        return "", ""
    return (pair[0] if is_valid_uid(pair[0]) else "", pair[1] if is_valid_uid(pair[1]) else "")


def _prepare_one(part: Part, backend: Backend, origin: Origin, study: str | None) -> InstanceRecord:
    if part.refused is not None:
        raise part.refused
    assert part.path is not None
    part.uids = _uids(part.path)
    try:
        syntax = str(read_file_meta_info(part.path).TransferSyntaxUID)
    except Exception:
        raise InvalidDataset(
            "the part is not a DICOM file with File Meta Information (PS3.10)"
        ) from None
    if syntax not in TRANSFER_SYNTAXES:
        raise InvalidDataset("the transfer syntax is not one this node accepts")
    if part.uids[0] not in STORAGE_SOP_CLASSES:
        raise UnsupportedSopClass("the SOP Class is not a storage class this node accepts")
    return prepare(
        part.path,
        transfer_syntax_uid=syntax,
        origin=origin,
        spool=backend.spool,
        expected=Expected(study_instance_uid=study),
    )


def store_parts(parts: list[Part], backend: Backend, origin: Origin, study: str | None) -> Outcome:
    """Ingest each received part as C-STORE would (blocking: run in a
    thread), in two steps: the parts are checked, fsynced and renamed into
    the spool by a few threads at once (their fsyncs overlap), then their
    index rows are committed together (the group commit), and only then is
    an instance reported stored."""
    outcome = Outcome()
    groups: set[str] = set()
    with ThreadPoolExecutor(max_workers=INGEST_THREADS, thread_name_prefix="stow") as pool:
        futures = [pool.submit(_prepare_one, part, backend, origin, study) for part in parts]
    prepared: list[tuple[Part, InstanceRecord]] = []
    failed: list[tuple[Part, BaseException]] = []
    for part, future in zip(parts, futures, strict=True):
        exc = future.exception()
        if exc is None:
            prepared.append((part, future.result()))
        else:
            _remove(part)
            failed.append((part, exc))
    items = [(r, opens_group(r, backend.indexer, groups)) for _, r in prepared]
    for (part, stored), exc in zip(prepared, backend.indexer.index_many(items), strict=True):
        if exc is None:
            outcome.stored.append(stored)
        else:
            failed.append((part, exc))
    for part, exc in sorted(failed, key=lambda item: item[0].number):
        outcome.failed.append((part, exc))
        status = dimse_status(exc)
        log.warning(
            "STOW-RS from %s: part %d refused with 0x%04X: %s",
            origin.peer_host,
            part.number,
            status,
            exc if status != 0x0110 else type(exc).__name__,
        )
    # As after an association's release: the assembler sees these groups end.
    backend.indexer.association_ended(sorted(groups), released=True)
    return outcome


def _answer(request: Request, outcome: Outcome, study: str | None) -> JSONResponse:
    base = base_url(request)
    ds = Dataset()
    studies = {r.study_instance_uid for r in outcome.stored} | ({study} if study else set())
    if len(studies) == 1:
        ds.RetrieveURL = study_url(base, next(iter(studies)))
    referenced = []
    for r in outcome.stored:
        item = Dataset()
        item.ReferencedSOPClassUID = r.sop_class_uid
        item.ReferencedSOPInstanceUID = r.sop_instance_uid
        item.RetrieveURL = instance_url(
            base, r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid
        )
        referenced.append(item)
    failed = []
    warnings = []
    for part, exc in outcome.failed:
        sop_class, sop_instance = part.uids
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class or None
        item.ReferencedSOPInstanceUID = sop_instance or None
        status = dimse_status(exc)
        item.FailureReason = int(status)
        failed.append(item)
        reason = str(exc) if status != 0x0110 else "internal error, see the pacsnode log"
        warnings.append(f'299 pacsnode "part {part.number}: 0x{status:04X} {reason}"')
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if failed:
        ds.FailedSOPSequence = failed
    code = 200 if not failed else 202 if referenced else 409
    headers = {"Warning": ", ".join(w.replace("\n", " ") for w in warnings[:_MAX_WARNINGS])}
    return JSONResponse(
        dataset_json(ds),
        status_code=code,
        media_type=DICOM_JSON,
        headers=headers if warnings else None,
    )


async def _stow(
    request: Request, principal: Any, settings: Settings, engine: Any, study: str | None
) -> Response:
    if study is not None and not is_valid_uid(study):
        raise MalformedBody("the study in the URL is not a valid UID (PS3.5 9.1)")
    backend = Backend.of(request)
    try:
        parts = await receive(request, backend.spool, settings)
    except Exception as exc:
        await run_in_threadpool(
            record, engine, principal, request, "dicomweb.store", study or "",
            outcome="refused", reason=type(exc).__name__,
        )  # fmt: skip
        raise
    origin = Origin(STOW_AE_TITLE, client_address(request))
    outcome = await run_in_threadpool(store_parts, parts, backend, origin, study)
    await run_in_threadpool(
        record,
        engine,
        principal,
        request,
        "dicomweb.store",
        study or ",".join(sorted({r.study_instance_uid for r in outcome.stored}))[:128],
        outcome="ok" if not outcome.failed else "partial" if outcome.stored else "refused",
        stored=len(outcome.stored),
        refused=len(outcome.failed),
    )
    return _answer(request, outcome, study)


@router.post("/studies", response_class=Response, summary="STOW-RS: store instances")
async def store(
    request: Request, principal: StoreDep, settings: SettingsDep, engine: EngineDep
) -> Response:
    return await _stow(request, principal, settings, engine, None)


@router.post(
    "/studies/{study}", response_class=Response, summary="STOW-RS: store instances of a study"
)
async def store_study(
    request: Request, principal: StoreDep, settings: SettingsDep, engine: EngineDep, study: str
) -> Response:
    return await _stow(request, principal, settings, engine, study)
