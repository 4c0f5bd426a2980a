"""Tables of the DICOM Conformance Statement (docs/conformance.md), generated
from the code that negotiates associations, so the document cannot drift.

Each table sits in the document between ``<!-- generated: NAME -->`` and
``<!-- end generated: NAME -->``; ``scripts/generate-docs`` rewrites them and
``scripts/generate-docs --check`` (and the test suite) fails when they differ.
The rest of the statement is prose, written by hand (PS3.2 structure).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from pydicom.uid import UID, Comprehensive3DSRStorage, SegmentationStorage
from pynetdicom import StoragePresentationContexts
from pynetdicom.presentation import PresentationContext

from pacsnode.core.settings import Settings
from pacsnode.scp.server import build_ae

_MARK = re.compile(
    r"(<!-- generated: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)",
    re.DOTALL,
)


def _name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else "(private or retired)"


def scp_contexts() -> list[PresentationContext]:
    """The presentation contexts the SCP accepts, as ``pacsnode serve`` builds them."""
    # Defaults only: the contexts do not depend on the configuration, and the
    # document must not depend on the environment it is generated in.
    return list(build_ae(Settings.model_construct()).supported_contexts)


def _syntax_sets(contexts: Iterable[PresentationContext]) -> list[tuple[str, ...]]:
    """Distinct transfer syntax lists, the largest first: TS-1, TS-2 …"""
    sets = {tuple(str(ts) for ts in c.transfer_syntax) for c in contexts}
    return sorted(sets, key=lambda s: (-len(s), s))


def _role(context: PresentationContext) -> str:
    if context.scu_role and context.scp_role:
        # PS3.7 D.3.3.4: a peer proposing the SCP role receives C-GET results
        # as C-STOREs over the same association.
        return "SCP; SCU by role selection (C-GET)"
    return "SCP"


def scp_sop_class_table() -> str:
    contexts = scp_contexts()
    sets = _syntax_sets(contexts)
    lines = [
        "| SOP Class | SOP Class UID | Role | Transfer syntaxes |",
        "| --- | --- | --- | --- |",
    ]
    for context in contexts:
        uid = str(context.abstract_syntax)
        syntaxes = tuple(str(ts) for ts in context.transfer_syntax)
        label = f"TS-{sets.index(syntaxes) + 1}"
        lines.append(f"| {_name(uid)} | `{uid}` | {_role(context)} | {label} |")
    return "\n".join(lines) + "\n"


def transfer_syntax_table() -> str:
    sets = _syntax_sets(scp_contexts())
    header = " | ".join(f"TS-{i}" for i in range(1, len(sets) + 1))
    lines = [
        f"| Transfer Syntax | UID | {header} |",
        "| --- | --- |" + " --- |" * len(sets),
    ]
    every = list(dict.fromkeys(ts for s in sets for ts in s))
    for uid in every:
        marks = " | ".join("yes" if uid in s else "" for s in sets)
        lines.append(f"| {_name(uid)} | `{uid}` | {marks} |")
    counts = ", ".join(f"TS-{i}: {len(s)}" for i, s in enumerate(sets, start=1))
    return "\n".join(lines) + f"\n\nTransfer syntaxes per set: {counts}.\n"


def scu_sop_class_table() -> str:
    """What pacsnode sends as a C-STORE SCU: the objects it creates (exports)
    and any storage SOP class it stored (C-MOVE sub-operations)."""
    lines = [
        "| SOP Class | SOP Class UID | Sent when |",
        "| --- | --- | --- |",
        f"| {_name(SegmentationStorage)} | `{SegmentationStorage}` | results of segmentation "
        "models (export, C-MOVE, C-GET) |",
        f"| {_name(Comprehensive3DSRStorage)} | `{Comprehensive3DSRStorage}` | TID 1500 "
        "measurement report of each job (export, C-MOVE, C-GET) |",
        f"| Verification SOP Class | `{UID('1.2.840.10008.1.1')}` | `pacsnode echo` |",
        f"| every storage SOP class of the SCP table ({len(StoragePresentationContexts)}) | "
        "see above | C-MOVE sub-operations of stored instances |",
    ]
    return "\n".join(lines) + "\n"


_MATCHING = {
    "UI": "single value, list of UIDs, universal",
    "text": "single value (case-sensitive), wildcard `*` `?`, universal",
    "PN": "single value and wildcard, case-insensitive; universal",
    "DA": "single value, range, universal",
    "TM": "single value, range, universal",
    "IS": "single value, universal",
    "ModalitiesInStudy": "single value or list (any series of the study), wildcard, universal",
    "count": "return key only",
}


def cfind_key_table() -> str:
    """The keys of :data:`db.qr.KEYS`, level by level (Study Root puts the
    patient keys at the STUDY level)."""
    from pydicom.datadict import tag_for_keyword

    from pacsnode.db.qr import KEYS, UNIQUE_KEY

    lines = ["| Level | Attribute | Tag | Type | Matching |", "| --- | --- | --- | --- | --- |"]
    for key in sorted(KEYS.values(), key=lambda k: k.level):
        tag = tag_for_keyword(key.keyword)
        assert tag is not None, key.keyword
        shown = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        unique = "U" if UNIQUE_KEY.get(key.level) == key.keyword else "R/O"
        matching = _MATCHING[key.kind.value]
        lines.append(f"| {key.level.name} | {key.keyword} | {shown} | {unique} | {matching} |")
    return "\n".join(lines) + "\n"


def implementation_table() -> str:
    import pynetdicom

    import pacsnode

    settings = Settings.model_construct()
    rows = [
        ("Implementation Class UID", f"`{pynetdicom.PYNETDICOM_IMPLEMENTATION_UID}` (pynetdicom)"),
        ("Implementation Version Name", f"`{pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION}`"),
        ("Product version", f"pacsnode {pacsnode.__version__}"),
        ("Default AE title", f"`{Settings.model_fields['ae_title'].default}` (`ae_title`)"),
        ("Default port", f"{Settings.model_fields['dicom_port'].default} (`dicom_port`)"),
        ("Maximum PDU size received", f"{settings.max_pdu_size} bytes (`max_pdu_size`)"),
        ("Maximum concurrent associations", f"{settings.max_associations} (`max_associations`)"),
    ]
    lines = ["| Item | Value |", "| --- | --- |"]
    lines += [f"| {item} | {value} |" for item, value in rows]
    return "\n".join(lines) + "\n"


def dicomweb_service_table() -> str:
    """Every DICOMweb resource, from the routes the server registers."""
    from fastapi.routing import APIRoute

    from pacsnode.api.dicomweb import PREFIX, qido, rendered, stow, wado

    lines = ["| Method | Resource | Transaction |", "| --- | --- | --- |"]
    for module in (qido, wado, rendered, stow):
        for route in module.router.routes:
            if isinstance(route, APIRoute):
                for method in sorted(route.methods or ()):
                    lines.append(f"| {method} | `{PREFIX}{route.path}` | {route.summary} |")
    return "\n".join(lines) + "\n"


def dicomweb_media_table() -> str:
    """Media types and transfer syntaxes each kind of resource negotiates."""
    from pacsnode.api.dicomweb import common, stow, wado

    def syntaxes(uids: Iterable[str]) -> str:
        return ", ".join(f"`{uid}` ({_name(uid)})" for uid in uids)

    multipart = common.MULTIPART
    rows = [
        ("QIDO-RS search", f"`{common.DICOM_JSON}`", "n/a"),
        (
            "WADO-RS study, series, instance",
            f'`{multipart}; type="{common.DICOM}"`',
            f"`*` (as stored); default {syntaxes([str(common.DEFAULT_TRANSFER_SYNTAX)])}; "
            f"{syntaxes(wado.INSTANCE_TRANSFER_SYNTAXES)}",
        ),
        ("WADO-RS metadata", f"`{common.DICOM_JSON}` (BulkDataURIs)", "n/a"),
        (
            "WADO-RS frames",
            f'`{multipart}; type="{common.OCTET_STREAM}"`',
            f"`*` (as stored); default {syntaxes(wado.FRAME_TRANSFER_SYNTAXES)}",
        ),
        ("WADO-RS bulk data", f'`{multipart}; type="{common.OCTET_STREAM}"`', "as stored"),
        (
            "WADO-RS rendered, thumbnail",
            ", ".join(f"`{t}`" for t in common.RENDERED_TYPES),
            "n/a (8-bit, windowed)",
        ),
        (
            "STOW-RS request",
            ", ".join(f'`{multipart}; type="{t}"`' for t in stow.REQUEST_TYPES),
            f"every transfer syntax of section 4.2 ({len(stow.TRANSFER_SYNTAXES)})",
        ),
        ("STOW-RS response", f"`{common.DICOM_JSON}`", "n/a"),
    ]
    lines = ["| Resource | Media types | Transfer syntaxes |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def dicomweb_query_table() -> str:
    """QIDO-RS: the attributes returned by default at each level and the
    query parameters besides the matching keys of section 6.1."""
    from pacsnode.api.dicomweb.qido import CONTROL_PARAMETERS, DEFAULT_FIELDS

    lines = ["| Level | Returned by default |", "| --- | --- |"]
    for level, fields in DEFAULT_FIELDS.items():
        lines.append(f"| {level.name} | {', '.join(fields)}, RetrieveURL |")
    lines.append("")
    lines.append("Query parameters besides matching keys: " + ", ".join(
        f"`{p}`" for p in CONTROL_PARAMETERS
    ) + ".")  # fmt: skip
    return "\n".join(lines) + "\n"


def stow_failure_table() -> str:
    """FailureReason values of STOW-RS: the C-STORE statuses of the errors."""
    from pacsnode.scp.status import StoreStatus

    lines = ["| FailureReason | Meaning |", "| --- | --- |"]
    for status in StoreStatus:
        if status is not StoreStatus.SUCCESS:
            words = status.name.replace("_", " ").lower()
            lines.append(f"| `0x{int(status):04X}` | {words} |")
    return "\n".join(lines) + "\n"


GENERATORS: dict[str, Callable[[], str]] = {
    "dicomweb-services": dicomweb_service_table,
    "dicomweb-media": dicomweb_media_table,
    "dicomweb-query": dicomweb_query_table,
    "stow-failures": stow_failure_table,
    "implementation": implementation_table,
    "cfind-keys": cfind_key_table,
    "scp-sop-classes": scp_sop_class_table,
    "transfer-syntaxes": transfer_syntax_table,
    "scu-sop-classes": scu_sop_class_table,
}


def render(document: str, generators: dict[str, Callable[[], str]] = GENERATORS) -> str:
    """``document`` with every generated block replaced by its current table.
    A block the document lacks, or a marker without a generator, is an error."""
    found = {m["name"] for m in _MARK.finditer(document)}
    missing = set(generators) - found
    unknown = found - set(generators)
    if missing or unknown:
        raise ValueError(f"generated blocks missing: {sorted(missing)}; unknown: {sorted(unknown)}")
    return _MARK.sub(lambda m: m[1] + "\n" + generators[m["name"]]() + "\n" + m[4], document)
