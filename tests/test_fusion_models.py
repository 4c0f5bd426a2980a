"""The fusion model: manifest rules, series selection by role, the decision
combination, and the held-out evaluation table of the bundled model.

The bundled ``ct-pt-avid-fusion`` model is for demonstration, not clinical use.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pacsnode.cli import app
from pacsnode.core.errors import ModelConfigError
from pacsnode.core.settings import BUNDLED_MODELS_DIR
from pacsnode.lab.fusion_recipe import NAME, avid_slices, study_spec
from pacsnode.lab.fusion_recipe import TINY as FUSION_TINY
from pacsnode.lab.phantom import generate_study
from pacsnode.models.manifest import ModelManifest, SeriesInfo, read_manifest
from pacsnode.workers.fusion import Candidate, choose_series, decision_scores, missing_outcome

BUNDLED = BUNDLED_MODELS_DIR / NAME / "manifest.yaml"


def bundled() -> ModelManifest:
    return read_manifest(BUNDLED)


def test_bundled_manifest_names_roles_weights_and_specs() -> None:
    m = bundled()
    assert m.task == "fusion" and m.fusion is not None and m.applies_to is None
    assert m.fusion.roles == ["ct", "pt"] and m.fusion.reference_role == "ct"
    weights = m.fusion.decision_weights
    assert set(weights) == {"ct", "pt"} and sum(weights.values()) == pytest.approx(1.0)
    assert m.fusion.preprocess["pt"].target_spacing is None
    assert m.input.channels == 2
    assert "for demonstration, not clinical use" in m.description
    weights_file = BUNDLED.parent / m.weights.file
    assert weights_file.stat().st_size < 2_000_000


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (
            {"inputs": {"ct": {"modality": "CT"}}, "preprocess": {}, "decision_weights": {}},
            "fusion.inputs",
        ),
        ({"inputs": {"ct": {"modality": "CT"}}}, "fusion.decision_weights.pt"),
        ({"reference": "mr"}, "fusion.reference"),
        ({"preprocess": {"pt": {"target_spacing": [1, 1, 1]}}}, "fusion.preprocess.pt"),
        ({"preprocess": {}}, "fusion.preprocess.pt"),
        ({"method": "decision", "decision_weights": {}}, "fusion.method"),
    ],
)
def test_fusion_manifest_mistakes_name_the_key(tmp_path: Path, change: dict, key: str) -> None:  # type: ignore[type-arg]
    data = yaml.safe_load(BUNDLED.read_text())
    data["fusion"].update(change)
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ModelConfigError, match=key.replace(".", r"\.")):
        read_manifest(path)


def candidate(uid: str, modality: str, slices: int) -> Candidate:
    return Candidate(uid, 0, SeriesInfo(modality, slices=slices))


def test_one_series_per_role_and_the_missing_roles() -> None:
    m = bundled()
    chosen, missing = choose_series(
        m, [candidate("1.1", "CT", 40), candidate("1.2", "CT", 80), candidate("1.3", "MR", 20)]
    )
    assert {r: c.series_instance_uid for r, c in chosen.items()} == {"ct": "1.2"}
    assert missing == ["pt"]
    chosen, missing = choose_series(m, [candidate("1.1", "CT", 40), candidate("1.4", "PT", 30)])
    assert sorted(chosen) == ["ct", "pt"] and missing == []


def test_missing_role_waits_until_the_deadline_then_is_incomplete() -> None:
    first = datetime(2026, 1, 1, 12, tzinfo=UTC)
    chosen = {"ct": candidate("1.1", "CT", 40)}
    waiting = missing_outcome(["pt"], chosen, first, 60, first + timedelta(seconds=10))
    assert waiting.state == "waiting" and waiting.deadline_at == first + timedelta(seconds=60)
    late = missing_outcome(["pt"], chosen, first, 60, first + timedelta(seconds=61))
    assert late.state == "incomplete" and "incomplete study" in late.detail
    assert late.series == {"ct": "1.1"}


def test_decision_combination_weighs_log_odds() -> None:
    p = np.array([[0.9, 0.1], [0.5, 0.5], [0.8, 0.8]])
    np.testing.assert_allclose(decision_scores(p, [1.0, 0.0]), [0.9, 0.5, 0.8])
    combined = decision_scores(p, [0.5, 0.5])
    assert combined[0] == pytest.approx(0.5) and combined[2] == pytest.approx(0.8)


def test_phantom_label_is_avid_lesions_only() -> None:
    study = generate_study(study_spec(FUSION_TINY, 110_001, None))
    labels = avid_slices(study)
    assert labels.shape == (study.reference.shape[0],)
    assert bool(labels.any()) == any(lesion.avid for lesion in study.lesions)


def test_evaluation_table_meets_the_fusion_target(tmp_path: Path) -> None:
    """`pacsnode evaluate` on held-out CT+PT phantoms (a small set, for CI):
    CT-only, PT-only, decision- and feature-level AUC side by side."""
    out = tmp_path / "evaluation"
    result = CliRunner().invoke(
        app,
        ["evaluate", NAME, "--studies", "24", "--out", str(out), "--check"],
        env={"PACSNODE_MODELS_DIR": str(BUNDLED_MODELS_DIR)},
    )
    assert result.exit_code == 0, result.output
    assert "Fusion models" in result.output and "feature-level" in result.output
    metrics = json.loads((out / NAME / "report.json").read_text())["metrics"]
    assert metrics["n"] == 24 and 0 < metrics["positives"] < 24
    best_single = max(metrics["roc_auc_ct"], metrics["roc_auc_pt"])
    best_fused = max(metrics["roc_auc_decision"], metrics["roc_auc_feature"])
    assert best_fused >= best_single + 0.05
    assert metrics["target_met"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert summary[NAME]["roc_auc_feature"] == metrics["roc_auc_feature"]
