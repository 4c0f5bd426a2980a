"""The infer and persist stages in a running node, with a real worker and
models loaded from a models folder: every task kind, the gate, masks on disk,
and re-runs that replace results.

The models here are untrained (the bundled, trained ones are tested for
accuracy elsewhere); thresholds are chosen so the outcome does not depend on
their weights: the segmenter's mask threshold 1e-6 takes every voxel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sqlalchemy import select

from pacsnode.db.models import Finding, Segment
from pacsnode.db.session import create_db_engine
from pacsnode.lab.phantom import SeriesSpec, write_ct_series
from tests.support import Node, node_config, storescu, wait_for
from tests.test_assembly import FAST, jobs

LESION = {"value": "52988006", "scheme_designator": "SCT", "meaning": "Lesion"}
SEGMENT = {
    "category": {
        "value": "49755003",
        "scheme_designator": "SCT",
        "meaning": "Morphologically Altered Structure",
    },
    "type": LESION,
}


def install_model(
    root: Path, name: str, task: str, architecture: str, shape: list[int], **extra: Any
) -> None:
    from pacsnode.lab.training import save_weights
    from pacsnode.models.architectures import build

    params: dict[str, Any] = {"base_filters": 4}
    if architecture == "sequence_classifier":
        params["slice_size"] = shape[-1]
    folder = root / name
    folder.mkdir(parents=True)
    sha256 = save_weights(build(architecture, params), folder / "model.weights.h5")
    manifest = {
        "manifest_version": 1,
        "name": name,
        "version": "0.1.0",
        "task": task,
        "description": "Untrained test model; for demonstration, not clinical use.",
        "applies_to": {"modality": ["CT"]},
        "input": {
            "preprocess": {
                "target_shape": [shape[0] if len(shape) == 3 else 12, 32, 32],
                "normalise": "window",
                "window": [40, 400],
            },
            "shape": shape[-2:],
        },
        "outputs": [] if task == "anomaly" else [{"name": "lesion", "concept": LESION}],
        "architecture": {"name": architecture, "params": params},
        "weights": {"file": "model.weights.h5", "sha256": sha256},
        **extra,
    }
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest))


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    install_model(
        root,
        "gate",
        "anomaly",
        "autoencoder",
        [32, 32],
        thresholds={"ood_reconstruction_error": 1e-9},  # everything is unfamiliar
    )
    install_model(root, "cls", "classification", "slice_classifier", [32, 32], gate="gate")
    install_model(root, "seq", "sequence", "sequence_classifier", [32, 32])
    install_model(
        root,
        "seg",
        "segmentation",
        "unet",
        [32, 32],
        outputs=[{"name": "lesion", "concept": LESION, "segment": SEGMENT}],
        thresholds={"mask": 1e-6},
    )
    return root


def results(node: Node) -> tuple[list[Any], list[Any]]:
    engine = create_db_engine(node.database_url)
    try:
        with engine.connect() as conn:
            findings = conn.execute(select(Finding).order_by(Finding.model_name)).all()
            segments = conn.execute(select(Segment)).all()
        return list(findings), list(segments)
    finally:
        engine.dispose()


def test_models_run_and_a_rerun_replaces_their_results(
    make_node, models_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    node = make_node(config=node_config(completion=FAST, models_dir=str(models_dir))).start()
    spec = SeriesSpec(slices=12, rows=64, columns=64, seed=21)
    write_ct_series(tmp_path / "ct", spec)
    storescu(node, tmp_path / "ct")
    (job,) = wait_for(
        lambda: (j := jobs(node)) and j[0].state in ("succeeded", "failed") and j,
        timeout=120,
        what="the job",
    )
    assert (job.state, job.error) == ("succeeded", "")
    findings, segments = results(node)
    assert [(f.model_name, f.task, f.code_value) for f in findings] == [
        ("cls", "classification", "52988006"),
        ("seg", "segmentation", "52988006"),
        ("seq", "sequence", "52988006"),
    ]
    assert all(0.0 <= f.probability <= 1.0 and f.job_pk == job.id for f in findings)
    # Only the classifier has the gate, whose threshold flags everything.
    assert {f.model_name: f.ood for f in findings} == {"cls": True, "seg": False, "seq": False}
    assert next(f for f in findings if f.model_name == "cls").ood_score > 0
    # Mask threshold 1e-6: the segment is the whole series, measured on its voxels.
    (segment,) = segments
    voxels = spec.slices * spec.rows * spec.columns
    voxel_mm3 = spec.pixel_spacing**2 * spec.slice_thickness
    assert segment.voxel_count == voxels
    assert segment.volume_mm3 == pytest.approx(voxels * voxel_mm3)
    assert (segment.bbox_z0, segment.bbox_z1, segment.bbox_x1) == (0, spec.slices, spec.columns)
    with np.load(node.data_dir / "results" / segment.mask_path) as saved:
        assert saved["segment_1"].shape == (spec.slices, spec.rows, spec.columns)
        assert saved["segment_1"].all()

    # The same study again: an update job whose results replace the first.
    storescu(node, tmp_path / "ct")
    wait_for(
        lambda: (j := jobs(node)) and len(j) == 2 and j[1].state == "succeeded" and j,
        timeout=120,
        what="the update job",
    )
    again, segments_again = results(node)
    assert len(again) == 3 and len(segments_again) == 1
    assert {f.job_pk for f in again} == {segments_again[0].job_pk} == {jobs(node)[1].id}
