"""A small, known data set for the admin API and CLI tests, written through
the db layer: three studies, their jobs, findings, segments, exports and
stage timings."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, insert, select

from pacsnode.db.index import upsert_instances
from pacsnode.db.models import Assembly, Export, Finding, Instance, Job, Segment, Study
from pacsnode.db.stats import record_timings
from tests.test_index import _record

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

# study key: (patient id, accession, date, modality, job state, lesion probability, ood)
STUDIES = {
    1: ("P1", "A1", "20260105", "CT", "succeeded", 0.91, False),
    2: ("P2", "A2", "20260210", "MR", "failed", 0.42, False),
    3: ("P1", "A3", "20260315", "CT", "succeeded", 0.85, True),
}


def study_uid(k: int) -> str:
    return f"1.2.3.{k}"


def populate(conn: Connection) -> dict[str, int]:
    """Write the data set; return ids worth knowing (failed job, failed export)."""
    ids: dict[str, int] = {}
    for k, (pid, acc, date, modality, state, prob, ood) in STUDIES.items():
        records = [
            replace(
                _record(n, series=0, study=k),
                patient_id=pid,
                accession_number=acc,
                study_date=date,
                modality=modality,
                received_at=NOW + timedelta(minutes=k),
            )
            for n in range(3)
        ]
        pks = upsert_instances(conn, records)
        study_pk, series_pk = pks[f"1.2.3.{k}.0"]
        assembly = conn.execute(
            insert(Assembly)
            .values(
                key_uid=study_uid(k),
                grouping="study",
                study_pk=study_pk,
                series_pk=None,
                calling_ae_title="CT1",
                state="triggered",
                next_kind="update",
                first_received_at=NOW,
                last_received_at=NOW,
            )
            .returning(Assembly.id)
        ).scalar_one()
        job = conn.execute(
            insert(Job)
            .values(
                assembly_pk=assembly,
                study_pk=study_pk,
                series_pk=None,
                pipeline="default",
                kind="initial",
                state=state,
                attempts=1,
                trigger_reason="released",
                instances=3,
                created_at=NOW,
                finished_at=NOW + timedelta(minutes=k),
                error="geometry: duplicate slice positions" if state == "failed" else "",
            )
            .returning(Job.id)
        ).scalar_one()
        if state == "failed":
            ids["failed_job"] = job
            continue
        common = dict(
            job_pk=job,
            study_pk=study_pk,
            series_pk=series_pk,
            model_name="lesion",
            model_version="1.0.0",
            weights_sha256="0" * 64,
            code_scheme="SCT",
            code_value="52988006",
            code_meaning="Lesion",
            ood=ood,
            created_at=NOW + timedelta(days=k),
        )
        conn.execute(
            insert(Finding).values(
                **common,
                task="classification",
                probability=prob,
                positive=prob >= 0.5,
                ood_score=0.1,
            )
        )
        conn.execute(
            insert(Segment).values(
                **{**common, "model_name": "lesion-seg"},
                segment_number=1,
                voxel_count=100 * k,
                volume_mm3=50.0 * k,
                bbox_z0=0,
                bbox_y0=1,
                bbox_x0=2,
                bbox_z1=3,
                bbox_y1=4,
                bbox_x1=5,
                mean_intensity=40.0,
                mask_path="",
            )
        )
        record_timings(conn, job, {"load": 0.1 * k, "infer": 1.0 * k}, [("lesion", 0.5 * k)])
        instance = conn.execute(
            select(Instance.id).where(Instance.sop_instance_uid == f"1.2.3.{k}.0.0")
        ).scalar_one()
        export = conn.execute(
            insert(Export)
            .values(
                instance_pk=instance,
                job_pk=job,
                destination="pacs",
                ae_title="PACS",
                host="127.0.0.1",
                port=104,
                state="failed" if k == 1 else "sent",
                attempts=3,
                created_at=NOW,
                next_attempt_at=None,
                deadline_at=NOW,
                last_error="association rejected" if k == 1 else "",
            )
            .returning(Export.id)
        ).scalar_one()
        if k == 1:
            ids["failed_export"] = export
    ids["studies"] = int(conn.execute(select(Study.id)).all().__len__())
    return ids
