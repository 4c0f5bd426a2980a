"""SQLAlchemy models of the DICOM information hierarchy pacsnode indexes.

Patient → Study → Series → Instance, with the attributes query/retrieve
(PS3.4 C.6) needs at each level. Attribute names follow DICOM keywords in
snake case. Dates stay DICOM DA strings (``YYYYMMDD``) so C-FIND range
matching can compare them lexically, exactly as the peer sent them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)

# Deterministic constraint names so Alembic migrations stay portable.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Type 2 in the Patient module: may be empty, so empty strings, not NULL,
    # keep the unique constraint meaningful.
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    first_received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    frame_of_reference_uid: Mapped[str] = mapped_column(UID, default="")
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    first_received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # Relative to the spool directory, so a data folder can move.
    path: Mapped[str] = mapped_column(String(255))
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    series: Mapped[Series] = relationship(back_populates="instances")


class Assembly(Base):
    """A study (or series, per the sender's policy) being received.

    Written with the instance rows (same transaction), so every acknowledged
    instance is accounted for; the assembler reads these rows to decide when
    the group is complete (docs/architecture.md §4).
    """

    __tablename__ = "assembly"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The Study Instance UID, or the Series Instance UID when grouping by series.
    key_uid: Mapped[str] = mapped_column(UID, unique=True)
    grouping: Mapped[str] = mapped_column(String(8))
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    series_pk: Mapped[int | None] = mapped_column(ForeignKey("series.id"), nullable=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    # assembling -> triggered (a job row was written) -> assembling again when
    # a late instance arrives (the next job is then an update).
    state: Mapped[str] = mapped_column(String(16), index=True)
    next_kind: Mapped[str] = mapped_column(String(8))
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Associations still sending this group, and when the last one released.
    sending: Mapped[int] = mapped_column(Integer, default=0)
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    triggered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    trigger_reason: Mapped[str] = mapped_column(String(32), default="")


class Job(Base):
    """The outbox: one row per unit of pipeline work, written in the same
    transaction that marks its study (or series) ready."""

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assembly_pk: Mapped[int] = mapped_column(ForeignKey("assembly.id"), index=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    series_pk: Mapped[int | None] = mapped_column(ForeignKey("series.id"), nullable=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))  # initial | update
    # pending -> queued -> running -> succeeded | failed
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    trigger_reason: Mapped[str] = mapped_column(String(32))
    instances: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str] = mapped_column(String(1024), default="")
    # The lease of the worker running it (pacsnode.db.jobs): "host pid N", and
    # until when; renewed by the worker's heartbeat, taken back once expired.
    lease_owner: Mapped[str] = mapped_column(String(128), default="", server_default="")
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    # Messages published for the job; a worker claims it only with the newest.
    fence: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class _ModelResult:
    """Columns every model result row has: which job, series and model
    version produced it, and its coded concept."""

    job_pk: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(32))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    code_scheme: Mapped[str] = mapped_column(String(16))
    code_value: Mapped[str] = mapped_column(String(64))
    code_meaning: Mapped[str] = mapped_column(String(64))


class Finding(_ModelResult, Base):
    """One coded finding of one model on one series: a classification label
    with its probability, and whether the out-of-distribution gate flagged the
    input. A re-run of the same model version on the series replaces its rows
    (db.results.replace_results), so results are never duplicated."""

    __tablename__ = "finding"
    __table_args__ = (
        UniqueConstraint("series_pk", "model_name", "model_version", "code_value", "code_scheme"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(16))
    probability: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool] = mapped_column(Boolean)
    ood: Mapped[bool] = mapped_column(Boolean)
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Segment(_ModelResult, Base):
    """One segment of one segmentation model on one series, with its
    measurements; the mask itself is a file under ``<data_dir>/results``
    (relative path), read back to encode DICOM-SEG."""

    __tablename__ = "segment"
    __table_args__ = (
        UniqueConstraint("series_pk", "model_name", "model_version", "segment_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    segment_number: Mapped[int] = mapped_column(Integer)
    voxel_count: Mapped[int] = mapped_column(BigInteger)
    volume_mm3: Mapped[float] = mapped_column(Float)
    # Bounding box in voxel indices of the source series, half-open [lo, hi).
    bbox_z0: Mapped[int] = mapped_column(Integer)
    bbox_y0: Mapped[int] = mapped_column(Integer)
    bbox_x0: Mapped[int] = mapped_column(Integer)
    bbox_z1: Mapped[int] = mapped_column(Integer)
    bbox_y1: Mapped[int] = mapped_column(Integer)
    bbox_x1: Mapped[int] = mapped_column(Integer)
    mean_intensity: Mapped[float | None] = mapped_column(Float, nullable=True)
    ood: Mapped[bool] = mapped_column(Boolean)
    mask_path: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Export(Base):
    """One output object owed to one destination (docs/architecture.md §3, exports).

    Written by the pipeline's export stage, one row per (instance, destination
    name); sent by the ``export_due`` task (:mod:`scp.export`). The row is the
    export's whole state: a failure stays here, visible and re-triggerable
    (``pacsnode exports``), until the object is sent or the deadline passes.
    The destination's AE title, host and port (a DICOM destination) or its
    URL (a DICOMweb destination: ``url`` set, empty AE title and host, port
    0) are copied at enqueue time, so the row shows where it is really going
    even after the configuration changes (``pacsnode exports retry``
    refreshes them). Credentials are never stored: they stay in the
    configuration, looked up by destination name when the row is sent.

    pending → sending (claimed by a worker) → sent, or → retrying (backoff)
    → sending … → failed (deadline passed); failed or retrying → pending by
    ``retry``. See :mod:`db.exports`, the only writer.
    """

    __tablename__ = "export"
    __table_args__ = (
        UniqueConstraint("instance_pk", "destination"),
        Index("ix_export_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instance.id"), index=True)
    job_pk: Mapped[int | None] = mapped_column(ForeignKey("job.id"), nullable=True, index=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    # A DICOMweb destination's base URL (STOW-RS); NULL for a DICOM AE.
    url: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    # pending | sending | retrying | sent | failed
    state: Mapped[str] = mapped_column(String(16))
    # Sends tried so far: counted when a worker claims the row.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # When the row is due; NULL once it is sent or failed.
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # When a worker claimed it (the claim's token and its lease start).
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    deadline_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Short, and never patient data (no peer-supplied Error Comment).
    last_error: Mapped[str] = mapped_column(String(256), default="")
    # DIMSE status of the last C-STORE response (PS3.4 B.2.3), or the STOW-RS
    # response's FailureReason / WarningReason for the instance (PS3.18), if one came.
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ApiToken(Base):
    """A bearer token of the admin API (``pacsnode tokens create``).

    Only the SHA-256 of the token is stored: the token itself is printed once
    and cannot be read back from the database.
    """

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(8))  # read | admin | store
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditEvent(Base):
    """Who did what, when and from where (:mod:`db.audit`, the only writer).

    Rows are written in the transaction of the action they record, so an
    action and its audit row commit (or vanish) together. ``detail`` is a
    short JSON text: identifiers, counts and filters, never patient names.
    """

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # api | dicom | export | cli
    channel: Mapped[str] = mapped_column(String(16), index=True)
    # "token:<name>", an AE title, a destination name, "cli:<user>"
    actor: Mapped[str] = mapped_column(String(96))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(128), default="")
    source: Mapped[str] = mapped_column(String(96), default="")  # host or address
    outcome: Mapped[str] = mapped_column(String(16), default="ok")
    detail: Mapped[str] = mapped_column(String(2048), default="")


class ModelSwitch(Base):
    """An administrator's enable/disable of a model (``name``, or one
    ``version`` of it), read by workers before each job; it overrides the
    ``disabled_models`` setting for that key."""

    __tablename__ = "model_switch"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(32), default="")  # "": every version
    enabled: Mapped[bool] = mapped_column(Boolean)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    changed_by: Mapped[str] = mapped_column(String(96), default="")


class StageTiming(Base):
    """How long one pipeline stage took in one run of a job; ``model_name``
    is set on the per-model forward-pass rows (stage ``forward``)."""

    __tablename__ = "stage_timing"
    __table_args__ = (Index("ix_stage_timing_stage_recorded_at", "stage", "recorded_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    model_name: Mapped[str] = mapped_column(String(64), default="")
    seconds: Mapped[float] = mapped_column(Float)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FindingSource(Base):
    """A series that contributed to a finding. A fusion model's finding lies
    on its reference series (``finding.series_pk``) and has one row here per
    role (CT, PT…); written and replaced with the finding (db.results)."""

    __tablename__ = "finding_source"
    __table_args__ = (UniqueConstraint("finding_pk", "series_pk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    finding_pk: Mapped[int] = mapped_column(ForeignKey("finding.id"), index=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    role: Mapped[str] = mapped_column(String(64))


class FusionOutcome(Base):
    """Where a study-level fusion model stands on one study (db.fusion).

    waiting (a role's series has not arrived; ``deadline_at`` bounds the
    wait) → incomplete (the deadline passed: recorded, not retried) or
    fused (every role present, results written) or failed (the series could
    not be fused, e.g. different Frames of Reference; ``detail`` says why).
    A late series starts an update job that runs the model again and
    replaces the outcome.
    """

    __tablename__ = "fusion_outcome"
    __table_args__ = (UniqueConstraint("study_pk", "model_name", "model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    # Roles still missing, comma-separated; the chosen series as role=UID lines.
    missing_roles: Mapped[str] = mapped_column(String(256), default="")
    series: Mapped[str] = mapped_column(String(1024), default="")
    detail: Mapped[str] = mapped_column(String(1024), default="")
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
