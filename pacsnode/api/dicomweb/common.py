"""What the DICOMweb services share: finding stored instances, media types
and their Accept negotiation (PS3.18 §8.7), URLs, and the audit row.

Media types are tables here, so the conformance statement
(:mod:`pacsnode.conformance`) is generated from the same values the
services negotiate with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from sqlalchemy import Engine

from pacsnode.api.deps import Principal
from pacsnode.core.errors import InvalidQuery, NotAcceptable, NotFound
from pacsnode.core.settings import Settings
from pacsnode.db import audit
from pacsnode.db.qr import InformationModel, StoredInstance, instances, retrieve_query

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"
# PS3.18 §8.7.3.5.2: the default transfer syntax of application/dicom parts.
DEFAULT_TRANSFER_SYNTAX = ExplicitVRLittleEndian
# What pacsnode transcodes to, from any syntax whose pixel data it can decode.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
RENDERED_TYPES = ("image/jpeg", "image/png")
ANY = "*"


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: ``type/subtype`` with its parameters."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        if self.media_type in ("*/*", media_type):
            return True
        major = media_type.split("/")[0]
        return self.media_type == f"{major}/*"


def _split(value: str, sep: str) -> list[str]:
    """Split at ``sep`` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first (``*/*`` if absent)."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[MediaRange] = []
    for item in _split(header, ","):
        pieces = _split(item, ";")
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append(MediaRange(pieces[0].lower(), params, q))
    return sorted(ranges, key=lambda r: -r.q)


@dataclass(frozen=True)
class Target:
    """What a retrieve sends: the part media type and the transfer syntax
    (``*``: each instance as stored)."""

    part_type: str
    transfer_syntax: str


def negotiate(accept: str | None, part_type: str, offered: tuple[str, ...]) -> Target:
    """The first acceptable representation of a multipart retrieve whose parts
    are ``part_type`` (PS3.18 §8.7.3): ``multipart/related; type=...`` with an
    optional ``transfer-syntax`` (``*`` or one of ``offered``), or a wildcard.
    NotAcceptable (406) when nothing offered is acceptable."""
    for rng in parse_accept(accept):
        if rng.media_type == MULTIPART:
            part = rng.params.get("type", part_type).lower()
            if part not in (part_type, "*/*"):
                continue
        elif not rng.matches(MULTIPART):
            continue
        syntax = rng.params.get("transfer-syntax", "")
        if not syntax:
            return Target(part_type, DEFAULT_TRANSFER_SYNTAX)
        if syntax == ANY or syntax in offered:
            return Target(part_type, syntax)
    raise NotAcceptable(
        f"none of the accepted media types can be served: this resource is "
        f'{MULTIPART}; type="{part_type}" with transfer-syntax '
        f"{', '.join([ANY, *offered])}"
    )


def can_transcode(stored: str, target: str) -> bool:
    """Whether an instance stored in ``stored`` can be sent in ``target``."""
    if target in (ANY, stored):
        return True
    if target not in UNCOMPRESSED or stored == ExplicitVRBigEndian:
        return False
    uid = UID(stored)
    if not uid.is_compressed:
        return True
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False


def locate(
    engine: Engine, study: str, series: str | None = None, instance: str | None = None
) -> list[StoredInstance]:
    """The stored instances of a study, series or instance; NotFound if none."""
    keys: dict[str, tuple[str, ...]] = {"StudyInstanceUID": (study,)}
    level = "STUDY"
    if series is not None:
        keys["SeriesInstanceUID"] = (series,)
        level = "SERIES"
    if instance is not None:
        keys["SOPInstanceUID"] = (instance,)
        level = "IMAGE"
    try:
        query = retrieve_query(InformationModel.STUDY_ROOT, level, keys)
    except InvalidQuery as exc:
        raise NotFound(f"no such resource: {exc}") from None
    found = instances(engine, query)
    if not found:
        what = "instance" if instance else "series" if series else "study"
        raise NotFound(f"no such {what} on this node")
    return found


def spool_path(settings: Settings, stored: StoredInstance) -> Path:
    return settings.spool_dir / stored.path


def base_url(request: Request) -> str:
    """The DICOMweb service's base URL as the client addressed it (the
    mount's root path ends in ``/dicom-web``)."""
    root = str(request.scope.get("root_path", "")).rstrip("/")
    netloc = request.url.netloc
    server = request.scope.get("server")
    # Some clients (dicomweb-client among them) send a Host header without the
    # port: when the host is this server's own address, add the port it
    # listens on, so BulkDataURIs and RetrieveURLs reach it.
    if server and ":" not in netloc and netloc == server[0] and server[1] not in (80, 443):
        netloc = f"{netloc}:{server[1]}"
    return f"{request.url.scheme}://{netloc}{root}"


def study_url(base: str, study: str) -> str:
    return f"{base}/studies/{study}"


def series_url(base: str, study: str, series: str) -> str:
    return f"{study_url(base, study)}/series/{series}"


def instance_url(base: str, study: str, series: str, instance: str) -> str:
    return f"{series_url(base, study, series)}/instances/{instance}"


def record(
    engine: Engine,
    principal: Principal,
    request: Request,
    action: str,
    target: str,
    outcome: str = "ok",
    **detail: object,
) -> None:
    """One audit row per retrieve or store (UIDs and counts, no patient data)."""
    with engine.begin() as conn:
        audit.record(
            conn,
            principal.actor,
            action,
            target=target,
            outcome=outcome,
            detail={"path": request.url.path, **detail},
        )
