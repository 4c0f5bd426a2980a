"""Send DICOM files to a peer: the C-STORE SCU behind ``pacsnode send``.

Files and folders (recursively) are read as they are stored: every storage
SOP class, in the transfer syntax of the file (compressed pixel data is sent
compressed, never transcoded). The presentation contexts are derived from
the files (PS3.8 §9.3.2.2): one per SOP class and transfer syntax, each
offering only the file's own syntax, so the acceptor cannot choose another
(PS3.8 §9.3.3.2). An association holds at most 128
presentation contexts (PS3.8 §9.3.2.2: odd context IDs 1-255), so a folder
with more pairs is sent over one association per group of 128; usually
there is one.

What can go wrong, and how it is reported: a path that does not exist
raises :class:`ValueError` before anything is sent; a file that is not DICOM
(no Part 10 header, PS3.10 §7.1) or not a storage SOP instance is skipped
with its reason; no association raises :class:`SendFilesError` (the SCU
helper's errors, :mod:`pacsnode.scp.scu`); a
refused instance, a context the peer did not accept or a lost association
is listed per file with its status (PS3.4 B.2.3: Success and Warning mean
stored).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from pacsnode.scp import scu

MAX_CONTEXTS = 128  # PS3.8 §9.3.2.2: presentation context IDs are odd numbers 1-255


#: No association: :class:`scu.AssociationRejected` (with the A-ASSOCIATE-RJ
#: result, source and reason; :func:`pacsnode.scp.status.explain_reject` says
#: it in words with a hint) or :class:`scu.NoAssociation`.
SendFilesError = scu.ScuError


@dataclass(frozen=True, slots=True)
class Instance:
    """One DICOM file to send: its path and what its Part 10 header says."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str

    @property
    def context_key(self) -> tuple[str, str]:
        """The presentation context this file needs (SOP class, transfer syntax)."""
        return self.sop_class_uid, self.transfer_syntax_uid


@dataclass
class SendReport:
    stored: int = 0
    warnings: int = 0  # stored with a Warning status (included in ``stored``)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (file, status in words)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why not sent)
    associations: int = 0

    @property
    def ok(self) -> bool:
        """True if every DICOM file was stored (skipped non-DICOM files do not count)."""
        return not self.failed


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Files named and the files under folders named (recursive, sorted);
    :class:`ValueError` if a path does not exist."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return list(dict.fromkeys(found))


def read_instance(path: Path) -> Instance | str:
    """The file's header, or why it is not sent (not DICOM, not storage)."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError) as exc:
        return f"not a DICOM file ({exc})" if isinstance(exc, EOFError) else "not a DICOM file"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable: {exc}"
    meta = getattr(ds, "file_meta", None)
    sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    sop_instance = str(
        ds.get("SOPInstanceUID", "") or getattr(meta, "MediaStorageSOPInstanceUID", "")
    )
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if not sop_class or not sop_instance or not syntax:
        return "no SOP Class, SOP Instance or Transfer Syntax UID in its header"
    try:
        service = uid_to_service_class(sop_class).__name__
    except Exception:
        service = ""
    if service not in ("StorageServiceClass", "NonPatientObjectStorageServiceClass"):
        return f"not a storage SOP instance (SOP class {sop_class} {UID(sop_class).name})"
    return Instance(path, sop_class, sop_instance, syntax)


def context_groups(instances: list[Instance]) -> list[list[tuple[str, str]]]:
    """The context keys the instances need, in groups of at most 128."""
    keys = list(dict.fromkeys(i.context_key for i in instances))
    return [keys[i : i + MAX_CONTEXTS] for i in range(0, len(keys), MAX_CONTEXTS)]


def _contexts(keys: list[tuple[str, str]]) -> list[PresentationContext]:
    return [build_context(sop_class, [syntax]) for sop_class, syntax in keys]


def _status_words(code: int) -> str:
    category = code_to_category(code)
    description = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))[1]
    return f"0x{code:04X} {category}" + (f": {description}" if description else "")


def send_files(
    paths: Iterable[Path],
    called_ae: str,
    host: str,
    port: int,
    calling_ae: str,
    progress: Callable[[int], None] | None = None,
    timeout: float = 30.0,
) -> SendReport:
    """C-STORE the DICOM files in ``paths``; ``progress(1)`` after each file
    (sent, failed or skipped). See the module docstring for what can go wrong."""
    report = SendReport()
    instances: list[Instance] = []
    for path in collect_files(paths):
        found = read_instance(path)
        if isinstance(found, str):
            report.skipped.append((path, found))
            if progress is not None:
                progress(1)
        else:
            instances.append(found)
    for keys in context_groups(instances):
        wanted = set(keys)
        batch = [i for i in instances if i.context_key in wanted]
        _send_batch(batch, keys, (called_ae, host, port, calling_ae), report, progress, timeout)
    return report


def _send_batch(
    batch: list[Instance],
    keys: list[tuple[str, str]],
    peer: tuple[str, str, int, str],
    report: SendReport,
    progress: Callable[[int], None] | None,
    timeout: float,
) -> None:
    called_ae, host, port, calling_ae = peer
    contexts = [(sop_class, (syntax,)) for sop_class, syntax in keys]
    with scu.associate(
        calling_ae, scu.Peer(called_ae, host, port), contexts, timeout=timeout
    ) as assoc:
        report.associations += 1
        accepted = {
            (str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts
        }
        for instance, category, words in _store_each(assoc, batch, accepted):
            if category in ("Success", "Warning"):
                report.stored += 1
                report.warnings += category == "Warning"
            else:
                report.failed.append((instance.path, words))
            if progress is not None:
                progress(1)


def _store_each(
    assoc: object, batch: list[Instance], accepted: set[tuple[str, str]]
) -> Iterator[tuple[Instance, str, str]]:
    """Yield each instance with its status category (PS3.4 B.2.3) and the status in words."""
    from pynetdicom.association import Association

    link = cast(Association, assoc)
    for instance in batch:
        if instance.context_key not in accepted:
            yield (
                instance,
                "Failure",
                (
                    f"the peer did not accept {UID(instance.sop_class_uid).name} in "
                    f"{UID(instance.transfer_syntax_uid).name}"
                ),
            )
            continue
        if not link.is_established:
            yield instance, "Failure", "association lost before it was sent"
            continue
        try:
            ds = dcmread(instance.path)
        except (OSError, ValueError, InvalidDicomError) as exc:
            yield instance, "Failure", f"unreadable: {exc}"
            continue
        status = link.send_c_store(ds)
        code = int(status.Status) if status and "Status" in status else None
        if code is None:
            yield instance, "Failure", "no response (the peer timed out or aborted)"
        else:
            yield instance, code_to_category(code), _status_words(code)
