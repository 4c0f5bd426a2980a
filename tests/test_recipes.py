"""Training recipes of the bundled models and ``pacsnode train`` / ``evaluate``.

The smoke test trains every recipe at the tiny scale (8 mm pixels, a few
steps, tiny networks) through the CLI into a temporary models folder, checks
what the registry makes of it, and evaluates it on a few held-out phantoms.
Full training does not run here (minutes per model).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pacsnode.cli import app
from pacsnode.lab.fusion_recipe import NAME as FUSION
from pacsnode.lab.recipe_data import HELD_OUT_SEED, VALIDATION_SEED, fit_size, min_voxels
from pacsnode.lab.recipes import GATE, RECIPES, fit_positive_threshold
from pacsnode.models.manifest import read_manifest
from pacsnode.models.registry import Registry, sha256_of


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("PACSNODE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    return monkeypatch


def test_seeds_and_helpers() -> None:
    assert VALIDATION_SEED < HELD_OUT_SEED
    assert min_voxels(1.5) == 10 and min_voxels(8.0) == 1
    assert fit_size(np.ones((2, 5, 7)), 6).shape == (2, 6, 6)
    labels = np.array([0, 0, 0, 1, 1, 1])
    threshold = fit_positive_threshold(labels, np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9]))
    assert 0.3 < threshold < 0.6
    assert fit_positive_threshold(np.ones(3), np.ones(3)) == 0.5


def test_train_and_evaluate_tiny_models_through_the_cli(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    runner = CliRunner()
    started = time.monotonic()
    result = runner.invoke(app, ["train", "all", "--tiny", "--seed", "3", "--out", str(models_dir)])
    assert result.exit_code == 0, result.output
    for name, recipe in RECIPES.items():
        folder = models_dir / name
        manifest = read_manifest(folder / "manifest.yaml")
        weights = folder / manifest.weights.file
        assert weights.is_file() and sha256_of(weights) == manifest.weights.sha256
        assert manifest.task == recipe.task and manifest.version == "1.0.0"
        assert "for demonstration, not clinical use" in manifest.description
        assert manifest.gate == (None if name == GATE else GATE)
        training = json.loads((folder / "training.json").read_text())
        assert training["seed"] == 3 and training["weights_sha256"] == manifest.weights.sha256
    registry = Registry.load(models_dir)
    assert sorted(m.manifest.name for m in registry.models) == sorted([*RECIPES, FUSION])
    gate = registry.get(GATE)
    assert gate is not None and gate.manifest.thresholds.ood_reconstruction_error
    for name in ("ct-lesion-classifier", "ct-lesion-sequence"):
        model = registry.get(name)
        assert model is not None and 0 < model.manifest.thresholds.positive < 1
    segment = registry.get("ct-lesion-segmenter").manifest.outputs[0].segment  # type: ignore[union-attr]
    assert segment is not None and segment.category.value == "49755003"

    clean_env.setenv("PACSNODE_MODELS_DIR", str(models_dir))
    out = tmp_path / "evaluation"
    result = runner.invoke(app, ["evaluate", "all", "--studies", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Held-out phantoms" in result.output
    for name, recipe in RECIPES.items():
        report = json.loads((out / name / "report.json").read_text())
        assert report["model"] == name and report["task"] == recipe.task
        assert report["mode"] == "inference (training=False)"
    gate_report = json.loads((out / GATE / "report.json").read_text())["metrics"]
    assert gate_report["mr_as_ct_volumes"] == 2 and gate_report["noise_volumes"] == 2
    assert (out / GATE / "roc.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {*RECIPES, FUSION}
    fusion = summary[FUSION]
    assert fusion["task"] == "fusion" and fusion["n"] == 2
    assert {"roc_auc_ct", "roc_auc_pt", "roc_auc_decision", "roc_auc_feature"} <= set(fusion)
    assert time.monotonic() - started < 120  # about 25 s on 2 cores

    result = runner.invoke(app, ["evaluate", "no-such-model"])
    assert result.exit_code == 2
