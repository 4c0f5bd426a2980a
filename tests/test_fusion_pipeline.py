"""A CT+PT study through a real node: the bundled fusion model end to end.

``pacsnode serve`` (real SCP, assembler, dispatcher, embedded broker and
Celery worker) with only the bundled ``ct-pt-avid-fusion`` model installed.
The CT arrives in one association, the PT in a second one: the CT's job
finds no PT and records a bounded wait; the PT's update job fuses both and
writes a finding that names both series, in the database and in the SR
(checked by dciodvfy and read back with highdicom). A study whose PT never
comes is recorded as incomplete once ``fusion.max_wait_s`` has passed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from sqlalchemy import select

from pacsnode.core.settings import BUNDLED_MODELS_DIR
from pacsnode.db.models import Finding, FindingSource, FusionOutcome, Instance, Series
from pacsnode.db.session import create_db_engine
from pacsnode.lab.fusion_recipe import NAME
from pacsnode.lab.phantom import StudySpec, write_study
from tests.support import Node, node_config, storescu, wait_for
from tests.test_assembly import FAST, jobs
from tests.test_encode import SR_WARNING, dciodvfy

# A small CT (6 mm pixels, 10 mm slices) and the PT on its own coarser grid.
SPEC = StudySpec(
    seed=110_003, modalities=("CT", "PT"), size=64, slices=40, fov_mm=384.0,
    z_extent_mm=400.0, pt_size=32,
)  # fmt: skip


@pytest.fixture
def fusion_models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(BUNDLED_MODELS_DIR / NAME, root / NAME)
    return root


def query(node: Node, stmt: Any) -> list[Any]:
    engine = create_db_engine(node.database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(stmt).all())
    finally:
        engine.dispose()


def outcome(node: Node) -> Any:
    rows = query(node, select(FusionOutcome))
    return rows[0] if rows else None


def finished(node: Node, count: int) -> list[Any] | None:
    found = jobs(node)
    done = [j for j in found if j.state in ("succeeded", "failed")]
    return found if len(found) == count and len(done) == count else None


def test_pt_second_gives_one_fused_finding_on_both_series(
    make_node, fusion_models: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    written = write_study(tmp_path / "study", SPEC)
    config = node_config(completion=FAST, models_dir=str(fusion_models), fusion={"max_wait_s": 600})
    node = make_node(config=config).start()

    storescu(node, written.folder / "CT")
    (first,) = wait_for(lambda: finished(node, 1), timeout=90, what="the CT's job")
    assert (first.state, first.error) == ("succeeded", "")
    waiting = outcome(node)
    assert (waiting.state, waiting.missing_roles, waiting.job_pk) == ("waiting", "pt", first.id)
    assert waiting.deadline_at is not None
    assert query(node, select(Finding)) == []

    storescu(node, written.folder / "PT")  # the late series: an update job
    done = wait_for(lambda: finished(node, 2), timeout=120, what="the PT's update job")
    second = done[1]
    assert (second.kind, second.state, second.error) == ("update", "succeeded", "")
    fused = outcome(node)
    assert (fused.state, fused.missing_roles, fused.job_pk) == ("fused", "", second.id)
    assert "feature" in fused.detail and "decision" in fused.detail

    series = {r.modality: r for r in query(node, select(Series))}
    (finding,) = query(node, select(Finding))
    assert (finding.model_name, finding.task, finding.job_pk) == (NAME, "fusion", second.id)
    assert finding.series_pk == series["CT"].id  # the reference role
    assert (finding.code_scheme, finding.code_value) == ("99PACSNODE", "AVIDLESION")
    assert 0.0 <= finding.probability <= 1.0
    sources = query(node, select(FindingSource.role, FindingSource.series_pk))
    assert sorted(sources) == [("ct", series["CT"].id), ("pt", series["PT"].id)]
    assert f"fusion {NAME}@1.0.0 fused" in node.log()

    # The SR of the update job: the fused finding, sourced from both series.
    sr_row = wait_for(
        lambda: [r for r in query(node, select(Series)) if r.modality == "SR"],
        timeout=30, what="the SR series",
    )[0]  # fmt: skip
    ((path,),) = query(node, select(Instance.path).where(Instance.series_pk == sr_row.id))
    sr_path = node.data_dir / "spool" / path
    errors, warnings = dciodvfy(sr_path)
    assert errors == [] and set(warnings) <= {SR_WARNING}
    sr = hd.sr.srread(sr_path)
    referenced = {
        item.SeriesInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for item in study.ReferencedSeriesSequence
    }
    assert {series["CT"].series_instance_uid, series["PT"].series_instance_uid} <= referenced
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    (group,) = sr.content.get_image_measurement_groups()
    assert group.finding_type is not None and group.finding_type.value == "AVIDLESION"
    images = {str(image.referenced_sop_instance_uid) for image in group.source_images}
    in_series = {
        modality: {r.sop_instance_uid for r in query(
            node, select(Instance).where(Instance.series_pk == series[modality].id)
        )}
        for modality in ("CT", "PT")
    }  # fmt: skip
    assert images == in_series["CT"] | in_series["PT"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_missing_pt_is_recorded_as_incomplete_after_the_bounded_wait(
    make_node, fusion_models: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    written = write_study(tmp_path / "study", SPEC)
    config = node_config(completion=FAST, models_dir=str(fusion_models), fusion={"max_wait_s": 4})
    node = make_node(config=config).start()
    storescu(node, written.folder / "CT")
    (job,) = wait_for(lambda: finished(node, 1), timeout=90, what="the CT's job")
    assert (job.state, job.error) == ("succeeded", "")
    row = wait_for(
        lambda: (o := outcome(node)) is not None and o.state == "incomplete" and o,
        timeout=30, what="the incomplete outcome",
    )  # fmt: skip
    assert row.missing_roles == "pt" and "incomplete study" in row.detail
    assert query(node, select(Finding)) == []
    assert "incomplete study" in node.log()
    assert len(jobs(node)) == 1  # recorded once, no retries
