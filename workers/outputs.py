"""AI outputs: what they are called, and their place in the spool and the index.

**Identity.** UIDs come from pydicom's ``generate_uid`` (its root, and a
SHA-512 of the entropy sources: what defines the object), so a redelivered
job re-creates the same instances, in the spool, the index and at the PACS
(which keeps one copy per SOP Instance UID):

- a SEG's series from (study, model name, version, source series); its SOP
  instance also from the weights' SHA-256, the source instances and the SEG
  options: a late instance or new weights give a new SEG, an unchanged series
  keeps its SEG;
- the SR's series from the study; its SOP instance also from the job, so an
  update job (a series arrived later) writes a new report beside the old one.

Series numbers: the SR 9999, a SEG 9000-9899 hashed from (model name, source
series), the same for every run. Every SeriesDescription, the SEG's Content
Description and the Contributing Equipment's Contribution Description say the
results come from demonstration models, not for clinical use.

**Storage.** Each object is written like a received instance (docs/architecture.md §3):
a temporary file in the spool's ``.incoming``, then :meth:`Spool.adopt`
(fsync, rename to ``<Study>/<Series>/<SOP>.dcm``, fsync the folder). Once all
files are durable they are indexed in one transaction with
:func:`db.index.upsert_instances`, so query/retrieve serves them with their
study. The calling AE of these rows is the node's own AE title and the peer
host is empty: they were made here. The patient of the rows is the study's
patient as indexed (highdicom copies only some Patient module attributes, and
a missing IssuerOfPatientID would make a second patient row).

Indexing bypasses the study assembler on purpose: the storage SCP also notes
each arrival for assembly (``db.assembly.note_arrivals``), which would make the
node's own results start another job of their study.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import Connection, Engine, select

import pacsnode
from pacsnode.core.settings import SegOptions, Settings
from pacsnode.db.index import InstanceRecord, upsert_instances
from pacsnode.db.models import Instance, Patient, Study
from pacsnode.db.results import ModelIdentity
from pacsnode.scp.dataset import instance_record
from pacsnode.scp.spool import Spool, spool_relpath

log = logging.getLogger(__name__)

MANUFACTURER = "pacsnode"
DISCLAIMER = "Demonstration model output, not for clinical use"
SR_SERIES_NUMBER = 9999
SEG_SERIES_NUMBERS = range(9000, 9900)


def derived_uid(*parts: object) -> str:
    """A UID that is a pure function of ``parts`` (with ``prefix=None``
    pydicom would ignore them and return a random 2.25 UID)."""
    return str(generate_uid(entropy_srcs=["pacsnode", *map(str, parts)]))


def seg_uids(
    study_uid: str,
    model: ModelIdentity,
    series_uid: str,
    source_sop_uids: Sequence[str],
    options: SegOptions,
) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of ``model``'s SEG on the series
    ``series_uid`` made of the instances ``source_sop_uids``."""
    key = (study_uid, model.name, model.version, series_uid)
    instances = hashlib.sha256("\\".join(source_sop_uids).encode())
    content = (model.weights_sha256, instances.hexdigest(), options.segmentation_type)
    return (
        derived_uid("SEG series", *key),
        derived_uid("SEG", *key, *content, options.omit_empty_frames),
    )


def sr_uids(study_uid: str, job_id: int) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the report of job ``job_id``."""
    return derived_uid("SR series", study_uid), derived_uid("SR", study_uid, job_id)


def seg_series_number(model_name: str, source_series_uid: str) -> int:
    digest = hashlib.sha256(f"{model_name}\\{source_series_uid}".encode()).digest()
    numbers = SEG_SERIES_NUMBERS
    return numbers.start + int.from_bytes(digest[:4], "big") % len(numbers)


def description(head: str) -> str:
    """A SeriesDescription (LO, 64 characters) marking demonstration AI output."""
    tail = " (demo, not clinical)"
    return head[: 64 - len(tail)] + tail


def equipment(ae_title: str) -> dict[str, Any]:
    """General Equipment attributes of an output (the node made it) and the
    node as Processing Equipment in Contributing Equipment (PS3.3 C.12.1.1.5),
    as keyword arguments of highdicom's SOP classes."""
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MANUFACTURER,
        "software_versions": pacsnode.__version__,
        "device_serial_number": ae_title,
        "contributing_equipment": [
            hd.ContributingEquipment(
                MANUFACTURER,
                codes.DCM.ProcessingEquipment,
                manufacturer_model_name=MANUFACTURER,
                software_versions=pacsnode.__version__,
                station_name=ae_title,
                contribution_description=f"AI results. {DISCLAIMER}.",
            )
        ],
    }


@dataclass(frozen=True, eq=False)
class EncodedObject:
    """A built SEG or SR; ``source_series_instance_uid`` is empty for the SR."""

    dataset: Dataset
    kind: str  # "SEG" | "SR"
    model_names: tuple[str, ...]
    source_series_instance_uid: str


@dataclass(frozen=True)
class OutputObject:
    """One AI output written to the spool and indexed (``JobContext.outputs``).

    ``kind`` is ``"SEG"`` or ``"SR"``. ``model_name`` is the SEG's model; the
    SR reports every model of the job, so its ``model_name`` is empty and
    ``model_names`` lists them (a SEG's lists its one model).
    ``source_series_instance_uid`` is the series a SEG segments (empty for
    the SR). ``relpath`` is relative to ``settings.spool_dir``;
    ``instance_pk`` is the row id in the ``instance`` table.
    """

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    relpath: str
    instance_pk: int
    kind: str
    model_name: str
    model_names: tuple[str, ...]
    source_series_instance_uid: str
    size_bytes: int


def _write(spool: Spool, obj: EncodedObject) -> tuple[str, int]:
    """Write one object durably; return its spool path and size."""
    ds = obj.dataset
    relpath = spool_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    fd, name = tempfile.mkstemp(dir=spool.incoming, prefix="ai-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
        size = spool.adopt(Path(name), relpath)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return relpath, size


def _as_study_patient(conn: Connection, records: list[InstanceRecord]) -> list[InstanceRecord]:
    """``records`` with the patient of their study as the index has it."""
    row = conn.execute(
        select(Patient)
        .join(Study, Study.patient_pk == Patient.id)
        .where(Study.study_instance_uid == records[0].study_instance_uid)
    ).one_or_none()
    if row is None:
        return records
    return [
        replace(
            r,
            patient_id=row.patient_id,
            issuer_of_patient_id=row.issuer_of_patient_id,
            patient_name=row.patient_name,
            patient_birth_date=row.patient_birth_date,
            patient_sex=row.patient_sex,
        )
        for r in records
    ]


def store_outputs(
    objects: Sequence[EncodedObject], engine: Engine, settings: Settings
) -> list[OutputObject]:
    """Write ``objects`` into the spool, then index them in one transaction."""
    if not objects:
        return []
    spool = Spool(settings.spool_dir, settings.min_free_disk_mb * 2**20)
    spool.check_space(sum(len(o.dataset.get("PixelData", b"")) for o in objects))
    now = datetime.now(UTC)
    written: list[tuple[EncodedObject, InstanceRecord]] = []
    for obj in objects:
        relpath, size = _write(spool, obj)
        record = instance_record(
            obj.dataset,
            transfer_syntax_uid=str(obj.dataset.file_meta.TransferSyntaxUID),
            size_bytes=size,
            calling_ae_title=settings.ae_title,
            peer_host="",
            received_at=now,
        )
        assert record.path == relpath
        written.append((obj, record))
    with engine.begin() as conn:
        records = _as_study_patient(conn, [r for _, r in written])
        upsert_instances(conn, records)
        uids = [r.sop_instance_uid for r in records]
        pks = dict(
            conn.execute(
                select(Instance.sop_instance_uid, Instance.id).where(
                    Instance.sop_instance_uid.in_(uids)
                )
            ).all()
        )
    outputs = [
        OutputObject(
            sop_instance_uid=record.sop_instance_uid,
            sop_class_uid=record.sop_class_uid,
            series_instance_uid=record.series_instance_uid,
            relpath=record.path,
            instance_pk=int(pks[record.sop_instance_uid]),
            kind=obj.kind,
            model_name=obj.model_names[0] if obj.kind == "SEG" else "",
            model_names=obj.model_names,
            source_series_instance_uid=obj.source_series_instance_uid,
            size_bytes=record.size_bytes,
        )
        for obj, record in written
    ]
    for out in outputs:
        log.info(
            "study %s: %s %s written (%d bytes)",
            written[0][1].study_instance_uid,
            out.kind,
            out.sop_instance_uid,
            out.size_bytes,
        )
    return outputs
