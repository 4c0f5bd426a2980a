"""Retention (``pacsnode cleanup``): old studies go with their files and rows,
consistently; a study with unfinished work or unsent results never goes.

On SQLite and PostgreSQL through the index layer (studies in every state),
and once end to end: a real node ingests a phantom study, its job finishes,
``pacsnode cleanup`` deletes it, and ``pacsnode healthcheck`` answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select
from typer.testing import CliRunner

from pacsnode.cli import app
from pacsnode.db import jobs
from pacsnode.db.index import upsert_instances
from pacsnode.db.migrate import upgrade
from pacsnode.db.models import (
    Assembly,
    Export,
    Finding,
    Instance,
    Job,
    Patient,
    Segment,
    Series,
    Study,
)
from pacsnode.db.retention import apply_retention
from pacsnode.db.session import create_db_engine
from tests.support import Node, node_config, wait_for
from tests.test_index import _record

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=40)
CUTOFF = NOW - timedelta(days=30)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_db_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


class Site:
    """A data folder and an index holding studies in chosen states."""

    def __init__(self, engine: Engine, data_dir: Path) -> None:
        self.engine = engine
        self.data_dir = data_dir
        self.spool = data_dir / "spool"

    def study(
        self,
        n: int,
        *,
        received: datetime = OLD,
        assembly: str = "triggered",
        job: str | None = "succeeded",
        exports: tuple[str, ...] = ("sent",),
        patient: str = "P1",
    ) -> str:
        """Study ``1.2.3.<n>``: 2 instances (files in the spool), an assembly,
        a job with a finding and a segment (mask file), exports of one
        instance, a preprocessing cache entry."""
        records = [
            replace(_record(k, series=1, study=n), received_at=received, patient_id=patient)
            for k in (1, 2)
        ]
        for record in records:
            path = self.spool / record.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"DICM" * 10)
        series_uid = records[0].series_instance_uid
        cache = self.data_dir / "cache" / "preprocessed" / series_uid
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "entry.npy").write_bytes(b"0")
        mask = f"1.2.3.{n}/{series_uid}/segmenter-1.npz"
        (self.data_dir / "results" / mask).parent.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "results" / mask).write_bytes(b"0")
        with self.engine.begin() as conn:
            study_pk, series_pk = upsert_instances(conn, records)[series_uid]
            instance_pk = conn.execute(
                select(Instance.id).where(Instance.sop_instance_uid == records[0].sop_instance_uid)
            ).scalar_one()
            assembly_pk = conn.execute(
                insert(Assembly).values(
                    key_uid=f"1.2.3.{n}", grouping="study", study_pk=study_pk, series_pk=None,
                    calling_ae_title="CT1", state=assembly, next_kind="initial",
                    first_received_at=received, last_received_at=received, sending=0,
                ).returning(Assembly.id)
            ).scalar_one()  # fmt: skip
            if job is None:
                return f"1.2.3.{n}"
            job_pk = conn.execute(
                insert(Job).values(
                    assembly_pk=assembly_pk, study_pk=study_pk, pipeline="default",
                    kind="initial", state=job, attempts=1, trigger_reason="quiet_period",
                    instances=2, created_at=received,
                ).returning(Job.id)
            ).scalar_one()  # fmt: skip
            result = {
                "job_pk": job_pk, "study_pk": study_pk, "series_pk": series_pk,
                "model_name": "segmenter", "model_version": "1", "weights_sha256": "0" * 64,
                "code_scheme": "SCT", "code_value": "52988006", "code_meaning": "Lesion",
                "ood": False, "created_at": received,
            }  # fmt: skip
            conn.execute(
                insert(Finding).values(
                    **result, task="segmentation", probability=0.9, positive=True
                )
            )
            conn.execute(
                insert(Segment).values(
                    **result, segment_number=1, voxel_count=1, volume_mm3=1.0, bbox_z0=0,
                    bbox_y0=0, bbox_x0=0, bbox_z1=1, bbox_y1=1, bbox_x1=1, mask_path=mask,
                )
            )  # fmt: skip
            for k, state in enumerate(exports):
                conn.execute(
                    insert(Export).values(
                        instance_pk=instance_pk, job_pk=job_pk, destination=f"pacs{k}",
                        ae_title="PACS", host="127.0.0.1", port=104, state=state,
                        created_at=received, deadline_at=received + timedelta(days=1),
                    )
                )  # fmt: skip
        return f"1.2.3.{n}"

    def studies(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(Study.study_instance_uid)).scalars())

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                table.__tablename__: conn.execute(select(func.count()).select_from(table))
                .scalar_one()
                for table in (Patient, Study, Series, Instance, Assembly, Job, Finding, Segment,
                              Export)
            }  # fmt: skip

    def files(self, uid: str) -> list[Path]:
        found = list((self.spool / uid).rglob("*.dcm")) if (self.spool / uid).exists() else []
        found += list((self.data_dir / "results" / uid).rglob("*.npz"))
        found += list((self.data_dir / "cache" / "preprocessed").glob(f"{uid}.*/*.npy"))
        return found


def test_old_studies_go_unless_work_or_results_are_pending(engine: Engine, tmp_path: Path) -> None:
    site = Site(engine, tmp_path / "data")
    done = site.study(1)
    gave_up = site.study(2, job="failed", exports=())
    running = site.study(3, job="running")
    pending = site.study(4, job="pending", exports=())
    queued = site.study(5, job="queued", exports=())
    retrying = site.study(6, exports=("sent", "retrying"))
    unsent = site.study(7, exports=("pending",))
    failed_export = site.study(8, exports=("failed",))
    assembling = site.study(9, assembly="assembling", job=None)
    recent = site.study(10, received=NOW - timedelta(days=1))
    own_patient = site.study(11, patient="P2")
    before = site.counts()

    def run(**kwargs: bool) -> dict[str, list[str]]:
        verdicts = apply_retention(
            engine, data_dir=site.data_dir, spool_dir=site.spool, cutoff=CUTOFF, **kwargs
        )
        return {v.study_instance_uid: v.keep_reasons for v in verdicts}

    planned = run(dry_run=True)
    assert site.counts() == before  # a dry run deletes nothing
    assert recent not in planned  # inside the window: not even a candidate
    deletable = {uid for uid, reasons in planned.items() if not reasons}
    assert deletable == {done, gave_up, own_patient}

    verdicts = run()
    assert site.studies() == {
        running, pending, queued, retrying, unsent, failed_export, assembling, recent
    }  # fmt: skip
    assert verdicts[running] == ["job 3 is running"]
    assert verdicts[pending] == ["job 4 is pending"]
    assert verdicts[queued] == ["job 5 is queued"]
    assert verdicts[retrying] == [f"export {_export_id(engine, retrying)} to pacs1 is retrying"]
    assert verdicts[unsent][0].endswith("to pacs0 is pending")
    assert "is failed (pacsnode exports retry" in verdicts[failed_export][0]
    assert verdicts[assembling] == ["still being received (not yet complete)"]
    for uid in (done, gave_up, own_patient):
        assert site.files(uid) == [], uid
        assert not (site.spool / uid).exists()
    for uid in (running, failed_export, recent):
        assert len(site.files(uid)) == 2 + 1 + 1, uid  # two instances, a mask, a cache entry
    after = site.counts()
    assert after["study"] == before["study"] - 3
    assert after["instance"] == before["instance"] - 6
    assert after["job"] == before["job"] - 3
    assert after["finding"] == after["segment"] == after["job"]
    assert after["patient"] == before["patient"] - 1  # P2 had no other study; P1 stays

    # Exports that failed for good no longer hold their study back when the
    # operator says so; unfinished work still does.
    verdicts = run(discard_failed_exports=True)
    assert failed_export not in site.studies()
    assert site.files(failed_export) == []
    assert running in site.studies() and verdicts[running]


def _export_id(engine: Engine, study_uid: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(Export.id)
                .join(Instance, Instance.id == Export.instance_pk)
                .join(Series, Series.id == Instance.series_pk)
                .join(Study, Study.id == Series.study_pk)
                .where(Study.study_instance_uid == study_uid, Export.state == "retrying")
            ).scalar_one()
        )


def test_cleanup_command(
    engine: Engine, tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(engine, tmp_path / "data")
    done = site.study(1)
    running = site.study(2, job="running")
    monkeypatch.delenv("PACSNODE_CONFIG", raising=False)
    monkeypatch.setenv("PACSNODE_DATABASE_URL", database_url)
    monkeypatch.setenv("PACSNODE_DATA_DIR", str(site.data_dir))
    runner = CliRunner()

    result = runner.invoke(app, ["cleanup"])
    assert result.exit_code == 0, result.output
    assert "retention disabled" in result.output
    assert site.studies() == {done, running}

    monkeypatch.setenv("PACSNODE_RETENTION", '{"keep_days": 30}')
    result = runner.invoke(app, ["cleanup", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    lines = {row["study_instance_uid"]: row for row in map(json.loads, result.output.splitlines())}
    assert lines[done]["keep_reasons"] == [] and not lines[done]["deleted"]
    assert lines[running]["keep_reasons"] == ["job 2 is running"]
    assert site.studies() == {done, running}

    result = runner.invoke(app, ["cleanup"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "deleted 1 studies (2 instances" in result.output
    assert "kept: job 2 is running" in result.output
    assert site.studies() == {running}


def test_cleanup_and_healthcheck_on_a_running_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real node without its embedded worker (as the compose ``scp``
    service runs) ingests a phantom study over DICOM; its job stays
    unfinished, so cleanup with a zero-day window keeps the study; once the
    job has finished, cleanup deletes files and rows. The health check passes
    while the node runs and fails once it stopped."""
    peers = [{"ae_title": "STORESCU", "hosts": ["127.0.0.1"]}]
    node = Node(
        data_dir=tmp_path / "node",
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        config=node_config(peers, completion={"debounce_s": 0.1}),
        serve_args=["--no-worker"],
    ).start()
    engine = create_db_engine(node.database_url)
    runner = CliRunner()
    try:
        for key, value in {**node.env(), "PACSNODE_DICOM_PORT": str(node.port)}.items():
            if key.startswith("PACSNODE_"):
                monkeypatch.setenv(key, value)
        sent = runner.invoke(app, ["demo", "send", f"PACSNODE@127.0.0.1:{node.port}",
                                   "--modalities", "ct", "--slices", "3", "--size", "32",
                                   "--calling-ae", "STORESCU"])  # fmt: skip
        assert sent.exit_code == 0, sent.output
        wait_for(lambda: _job_states(engine) == ["queued"], timeout=30, what="a queued job")
        assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 3

        health = runner.invoke(app, ["healthcheck"])
        assert health.exit_code == 0 and "healthy" in health.output, health.output

        kept = runner.invoke(app, ["cleanup", "--keep-days", "0"], terminal_width=200)
        assert kept.exit_code == 0, kept.output
        assert "kept: job 1 is queued" in kept.output and "deleted 0 studies" in kept.output
        with engine.begin() as conn:  # as a worker would record it
            fence = conn.execute(select(Job.fence).where(Job.id == 1)).scalar_one()
            held = jobs.claim(conn, 1, fence, "test pid 1", datetime.now(UTC), first=True)
            assert held is not None and jobs.mark_succeeded(conn, held)

        cleaned = runner.invoke(app, ["cleanup", "--keep-days", "0"], terminal_width=200)
        assert cleaned.exit_code == 0, cleaned.output
        assert "deleted 1 studies (3 instances" in cleaned.output
        assert not [p for p in (node.data_dir / "spool").rglob("*") if p.name != ".incoming"]
        assert runner.invoke(app, ["studies", "--json"]).output == ""
        assert _job_states(engine) == []
    finally:
        node.stop()
        engine.dispose()
    # Rejected from the node's own AE title, and logged at DEBUG only.
    assert "association rejected: PACSNODE" not in node.log()
    down = runner.invoke(app, ["healthcheck", "--timeout", "2"])
    assert down.exit_code == 1 and "unhealthy: DICOM" in down.output


def _job_states(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(Job.state)).scalars())
