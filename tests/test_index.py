"""The index on both backends: migrations, idempotent upserts, group commit."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime

from sqlalchemy import func, select

from pacsnode.db.index import InstanceRecord
from pacsnode.db.migrate import current_revision, head_revision, upgrade
from pacsnode.db.models import Instance, Patient, Series, Study
from pacsnode.db.session import create_db_engine
from pacsnode.scp.indexer import GroupCommitIndexer


def _record(n: int, series: int = 0, study: int = 0) -> InstanceRecord:
    return InstanceRecord(
        patient_id="P1",
        issuer_of_patient_id="",
        patient_name="Doe^Jane",
        patient_birth_date="19800101",
        patient_sex="F",
        study_instance_uid=f"1.2.3.{study}",
        study_date="20260101",
        study_time="120000",
        accession_number="A1",
        study_id="1",
        study_description="CT chest",
        referring_physician_name="",
        series_instance_uid=f"1.2.3.{study}.{series}",
        modality="CT",
        series_number=series,
        series_description="axial",
        body_part_examined="CHEST",
        frame_of_reference_uid="1.2.3.9",
        sop_instance_uid=f"1.2.3.{study}.{series}.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=n,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        size_bytes=1000 + n,
        path=f"1.2.3.{study}/1.2.3.{study}.{series}/1.2.3.{study}.{series}.{n}.dcm",
        calling_ae_title="CT1",
        peer_host="127.0.0.1",
        received_at=datetime.now(UTC),
    )


def _counts(engine) -> tuple[int, int, int, int]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (Patient, Study, Series, Instance)
        )


def test_migrations_reach_head_and_are_repeatable(database_url: str) -> None:
    engine = create_db_engine(database_url)
    assert upgrade(engine) == head_revision()
    assert upgrade(engine) == head_revision()
    assert current_revision(engine) == head_revision()


def test_concurrent_group_commit_is_complete_and_idempotent(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    indexer = GroupCommitIndexer(engine)
    records = [_record(n, series=n % 3, study=n % 2) for n in range(120)]
    errors: list[BaseException] = []

    def send(chunk: list[InstanceRecord]) -> None:
        try:
            for record in chunk:
                indexer.index(record)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    # Eight "associations" at once, then every instance a second time.
    for _ in range(2):
        threads = [threading.Thread(target=send, args=(records[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    indexer.close()
    assert errors == []
    assert _counts(engine) == (1, 2, 6, 120)


def test_resent_instance_updates_in_place(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    indexer = GroupCommitIndexer(engine)
    first = _record(1)
    indexer.index(first)
    indexer.index(replace(first, size_bytes=4242, transfer_syntax_uid="1.2.840.10008.1.2"))
    indexer.close()
    with engine.connect() as conn:
        rows = conn.execute(select(Instance.size_bytes, Instance.transfer_syntax_uid)).all()
    assert rows == [(4242, "1.2.840.10008.1.2")]


def test_one_bad_record_does_not_fail_its_batch(database_url: str) -> None:
    engine = create_db_engine(database_url)
    upgrade(engine)
    indexer = GroupCommitIndexer(engine)
    # An over-long value is refused by PostgreSQL; SQLite stores it. Either
    # way the good records of the same batch must be committed.
    bad = replace(_record(99), modality="X" * 100, series_instance_uid="1.2.3.0.77")
    results: dict[str, BaseException | None] = {}

    def send(record: InstanceRecord) -> None:
        try:
            indexer.index(record)
            results[record.sop_instance_uid] = None
        except BaseException as exc:
            results[record.sop_instance_uid] = exc

    threads = [threading.Thread(target=send, args=(r,)) for r in [_record(1), bad, _record(2)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    indexer.close()
    assert results["1.2.3.0.0.1"] is None and results["1.2.3.0.0.2"] is None
    assert _counts(engine)[3] >= 2
