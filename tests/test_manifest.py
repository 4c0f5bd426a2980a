"""Model manifests and the registry: real files in tmp_path, no mocks."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from pacsnode.core.errors import ConfigError, ModelConfigError
from pacsnode.core.settings import load_settings
from pacsnode.models.manifest import SeriesInfo, read_manifest
from pacsnode.models.registry import Registry, version_key
from tests.support import Node, node_config

EXAMPLE = Path(__file__).parents[1] / "models" / "example-manifest.yaml"
BUNDLED = Path(__file__).parents[1] / "models" / "bundled"
WEIGHTS = b"not really weights, but bytes with a hash"

LESION = {"value": "52988006", "scheme_designator": "SCT", "meaning": "Lesion"}
ALTERED = {"value": "49755003", "scheme_designator": "SCT", "meaning": "Morphologically Altered"}


def classifier(**changes: Any) -> dict[str, Any]:
    """A valid classification manifest; ``changes`` replace top-level keys."""
    manifest: dict[str, Any] = {
        "manifest_version": 1,
        "name": "ct-lesion-cnn",
        "version": "1.0.0",
        "task": "classification",
        "description": "Lesion classifier; for demonstration, not clinical use.",
        "applies_to": {"modality": ["CT"]},
        "input": {
            "preprocess": {"target_shape": [32, 64, 64], "normalise": "minmax"},
            "shape": [64, 64],
        },
        "outputs": [{"name": "lesion", "concept": LESION}],
        "weights": {"file": "model.weights.h5", "sha256": hashlib.sha256(WEIGHTS).hexdigest()},
        "architecture": {"name": "slice_classifier", "params": {"base_filters": 8}},
    }
    manifest.update(changes)
    return copy.deepcopy(manifest)


def install(models_dir: Path, manifest: dict[str, Any] | str, folder: str | None = None) -> Path:
    """Write a model folder (manifest + weights); returns the manifest path."""
    name = folder or (manifest["name"] if isinstance(manifest, dict) else "model")
    path = models_dir / name / "manifest.yaml"
    path.parent.mkdir(parents=True)
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest, sort_keys=False)
    path.write_text(text)
    (path.parent / "model.weights.h5").write_bytes(WEIGHTS)
    return path


def load_error(models_dir: Path, **kwargs: Any) -> str:
    with pytest.raises(ModelConfigError) as info:
        Registry.load(models_dir, **kwargs)
    return str(info.value)


def test_valid_manifest_loads(tmp_path: Path) -> None:
    path = install(tmp_path, classifier())
    registry = Registry.load(tmp_path)
    (model,) = registry.models
    assert model.key == "ct-lesion-cnn@1.0.0"
    assert model.manifest_path == path
    assert model.weights_path == path.parent / "model.weights.h5"
    assert model.manifest.input.preprocess.normalise == "minmax"
    assert model.manifest.thresholds.positive == 0.5
    assert registry.get("ct-lesion-cnn") is model
    assert registry.get("other") is None
    (row,) = registry.describe()
    assert (row.name, row.version, row.task, row.applies_to, row.enabled) == (
        "ct-lesion-cnn",
        "1.0.0",
        "classification",
        "CT",
        True,
    )
    assert row.sha256 == hashlib.sha256(WEIGHTS).hexdigest()[:12]


def test_example_manifest_is_valid() -> None:
    manifest = read_manifest(EXAMPLE)
    assert manifest.task == "segmentation"
    assert manifest.outputs[0].segment is not None
    assert "not clinical use" in manifest.description


def test_bundled_manifests_load_and_say_demonstration() -> None:
    registry = Registry.load(BUNDLED)  # a missing folder is an empty registry
    for model in registry.models:
        assert "for demonstration, not clinical use" in model.manifest.description


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_no_models_is_fine(tmp_path: Path, state: str) -> None:
    models_dir = tmp_path / "models"
    if state == "empty":
        models_dir.mkdir()
        (models_dir / "notes.txt").write_text("not a model folder")
    assert Registry.load(models_dir).models == ()


def test_model_config_error_is_a_config_error() -> None:
    assert issubclass(ModelConfigError, ConfigError)


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = install(tmp_path, "name: [unclosed\nversion: '1'\n", folder="broken")
    message = load_error(tmp_path)
    assert str(path) in message and "not valid YAML" in message and "line" in message


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "must hold a mapping"),
        (b"- name: a\n", "must hold a mapping"),
        (b"name: \xff\xfe\n", "cannot read it"),
    ],
)
def test_unreadable_or_not_a_mapping(tmp_path: Path, content: bytes, problem: str) -> None:
    path = install(tmp_path, "", folder="odd")
    path.write_bytes(content)
    message = load_error(tmp_path)
    assert str(path) in message and problem in message


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    text = yaml.safe_dump(classifier()) + "thresholds: {positive: 0.9}\nthresholds: {}\n"
    path = install(tmp_path, text, folder="dup")
    message = load_error(tmp_path)
    assert str(path) in message and "duplicate key 'thresholds'" in message


def _without(key: str) -> dict[str, Any]:
    manifest = classifier()
    del manifest[key]
    return manifest


def _nested(path: str, value: Any) -> dict[str, Any]:
    manifest = classifier()
    *parents, last = path.split(".")
    node: Any = manifest
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    return manifest


@pytest.mark.parametrize(
    ("manifest", "key"),
    [
        (_without("weights"), "weights"),
        (_without("architecture"), "architecture"),
        (_nested("architecture.name", "resnet"), "architecture.name"),
        (_without("description"), "description"),
        (classifier(description="  "), "description"),
        (classifier(task="regression"), "task"),
        (classifier(name="CT Lesion"), "name"),
        (classifier(version=1.1), "version"),  # unquoted in YAML
        (classifier(manifest_version=2), "manifest_version"),
        (classifier(colour="red"), "colour"),
        (_nested("applies_to.bodypart", ["CHEST"]), "applies_to.bodypart"),
        (_nested("applies_to.series_description", "AX(IAL"), "applies_to.series_description"),
        (_nested("applies_to.modality", []), "applies_to.modality"),
        (_nested("applies_to.slices", {"min": 10, "max": 5}), "applies_to.slices.min"),
        (_nested("input.preprocess.window", [40, 400]), "input.preprocess"),
        (_nested("input.shape", [32, 32]), "input.shape"),
        (_nested("outputs.0.concept.value", "Lesion"), "outputs.0.concept.value"),
        (_nested("outputs.0.concept.value", 52988006), "outputs.0.concept.value"),
        (_nested("outputs.0.segment", {"category": ALTERED, "type": LESION}), "outputs.0.segment"),
        (classifier(outputs=[]), "outputs"),
        (_nested("weights.file", "../shared/model.weights.h5"), "weights.file"),
        (_nested("weights.file", "/etc/passwd"), "weights.file"),
        (_nested("weights.sha256", "abc"), "weights.sha256"),
        (classifier(thresholds={"ood_reconstruction_error": 0.1}), "thresholds"),
        (classifier(thresholds={"positive": 1.5}), "thresholds.positive"),
        (classifier(fusion={"inputs": {"ct": {"modality": ["CT"]}}}), "fusion"),
        (classifier(gate="ct-lesion-cnn"), "gate"),
    ],
)
def test_invalid_manifest_names_file_and_key(
    tmp_path: Path, manifest: dict[str, Any], key: str
) -> None:
    path = install(tmp_path, manifest, folder="bad-model")
    message = load_error(tmp_path)
    assert str(path) in message
    assert f"\n  {key}" in message, message


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"task": "segmentation"}, "outputs.0.segment"),
        ({"task": "anomaly", "outputs": []}, "thresholds.ood_reconstruction_error"),
        (
            {
                "task": "anomaly",
                "outputs": [],
                "gate": "other",
                "thresholds": {"ood_reconstruction_error": 0.02},
            },
            "gate",
        ),
        ({"task": "fusion", "applies_to": None}, "applies_to"),
        (
            {
                "task": "fusion",
                "applies_to": None,
                "fusion": {"inputs": {"ct": {"modality": "CT"}}, "decision_weights": {"pt": 1}},
            },
            "fusion.decision_weights.pt",
        ),
    ],
)
def test_task_specific_rules(tmp_path: Path, changes: dict[str, Any], key: str) -> None:
    manifest = {k: v for k, v in classifier(**changes).items() if v is not None}
    path = install(tmp_path, manifest)
    message = load_error(tmp_path)
    assert str(path) in message and f"\n  {key}:" in message, message


def test_valid_segmentation_anomaly_and_fusion(tmp_path: Path) -> None:
    segment = {"category": ALTERED, "type": LESION}
    install(
        tmp_path,
        classifier(
            name="seg",
            task="segmentation",
            gate="gate",
            outputs=[{"name": "lesion", "concept": LESION, "segment": segment}],
        ),
    )
    install(
        tmp_path,
        classifier(
            name="gate",
            task="anomaly",
            outputs=[],
            thresholds={"ood_reconstruction_error": 0.02},
        ),
    )
    fusion = classifier(
        name="fused",
        task="fusion",
        input={
            "preprocess": {"target_spacing": [4, 2, 2], "normalise": "minmax"},
            "shape": [64, 64],
            "channels": 2,
        },
        fusion={
            "inputs": {"ct": {"modality": ["CT"]}, "pt": {"modality": ["PT"]}},
            "preprocess": {"pt": {"normalise": "percentile"}},
        },
    )
    del fusion["applies_to"]
    install(tmp_path, fusion)
    registry = Registry.load(tmp_path)
    seg = registry.get("seg")
    assert seg is not None and registry.gate_for(seg) is registry.get("gate")
    rows = {row.name: row for row in registry.describe()}
    assert rows["fused"].applies_to == "ct: CT + pt: PT"
    # Fusion models that select by role are chosen per study, not per series.
    assert [m.key for m in registry.select(SeriesInfo("CT"))] == ["gate@1.0.0", "seg@1.0.0"]


def test_missing_weights_file(tmp_path: Path) -> None:
    path = install(tmp_path, classifier())
    (path.parent / "model.weights.h5").unlink()
    message = load_error(tmp_path)
    assert str(path) in message and "\n  weights.file:" in message and "does not exist" in message


def test_hash_mismatch(tmp_path: Path) -> None:
    path = install(tmp_path, classifier())
    (path.parent / "model.weights.h5").write_bytes(WEIGHTS + b"tampered")
    message = load_error(tmp_path)
    assert str(path) in message and "\n  weights.sha256:" in message
    assert hashlib.sha256(WEIGHTS + b"tampered").hexdigest() in message


def test_upper_case_hash_is_accepted(tmp_path: Path) -> None:
    digest = hashlib.sha256(WEIGHTS).hexdigest()
    install(tmp_path, _nested("weights.sha256", digest.upper()))
    assert Registry.load(tmp_path).models[0].manifest.weights.sha256 == digest


def test_duplicate_name_and_version(tmp_path: Path) -> None:
    first = install(tmp_path, classifier(), folder="a")
    second = install(tmp_path, classifier(), folder="b")
    message = load_error(tmp_path)
    assert str(first) in message and str(second) in message and "name, version" in message


def test_versions_side_by_side(tmp_path: Path) -> None:
    for version in ("1.2", "1.10", "1.10.0-rc1"):
        install(tmp_path, classifier(version=version), folder=f"v{version}")
    registry = Registry.load(tmp_path)
    assert [m.manifest.version for m in registry.models] == ["1.2", "1.10.0-rc1", "1.10"]
    latest = registry.get("ct-lesion-cnn")
    assert latest is not None and latest.manifest.version == "1.10"
    assert version_key("2.0.0") > version_key("2.0.0-rc1") > version_key("1.99")


@pytest.mark.parametrize(
    ("gate_task", "disabled", "problem"),
    [
        (None, [], "no model named 'gate'"),
        ("classification", [], "is not an anomaly model"),
        ("anomaly", ["gate"], "is disabled"),
    ],
)
def test_gate_must_be_an_enabled_anomaly_model(
    tmp_path: Path, gate_task: str | None, disabled: list[str], problem: str
) -> None:
    path = install(tmp_path, classifier(gate="gate"))
    if gate_task == "anomaly":
        install(
            tmp_path,
            classifier(name="gate", task="anomaly", thresholds={"ood_reconstruction_error": 1}),
        )
    elif gate_task is not None:
        install(tmp_path, classifier(name="gate", task=gate_task))
    message = load_error(tmp_path, disabled=disabled)
    assert str(path) in message and "\n  gate:" in message and problem in message


CHEST_CT = SeriesInfo(
    modality="CT",
    body_part_examined="CHEST",
    series_description="Thorax 1.0 B30f",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    slices=120,
    pixel_spacing=(0.7, 0.7),
    spacing_between_slices=1.0,
)


@pytest.mark.parametrize(
    ("rules", "selected"),
    [
        ({"modality": ["CT"]}, True),
        ({"modality": "ct"}, True),  # one value and lower case are accepted
        ({"modality": ["MR", "PT"]}, False),
        ({"modality": ["CT"], "body_part_examined": ["CHEST", "ABDOMEN"]}, True),
        ({"modality": ["CT"], "body_part_examined": ["HEAD"]}, False),
        ({"modality": ["CT"], "series_description": "thorax"}, True),
        ({"modality": ["CT"], "series_description": "^(?!.*scout)"}, True),
        ({"modality": ["CT"], "series_description": "^scout"}, False),
        ({"modality": ["CT"], "image_type": ["ORIGINAL", "PRIMARY"]}, True),
        ({"modality": ["CT"], "image_type": ["DERIVED"]}, False),
        ({"modality": ["CT"], "slices": {"min": 16, "max": 500}}, True),
        ({"modality": ["CT"], "slices": {"min": 200}}, False),
        ({"modality": ["CT"], "pixel_spacing_mm": {"max": 0.5}}, False),
        ({"modality": ["CT"], "pixel_spacing_mm": {"min": 0.5, "max": 1.0}}, True),
        ({"modality": ["CT"], "slice_spacing_mm": {"max": 3}}, True),
        ({"modality": ["CT"], "slice_spacing_mm": {"min": 3}}, False),
    ],
)
def test_selection(tmp_path: Path, rules: dict[str, Any], selected: bool) -> None:
    install(tmp_path, classifier(applies_to=rules))
    registry = Registry.load(tmp_path)
    assert bool(registry.select(CHEST_CT)) is selected


@pytest.mark.parametrize(
    "series",
    [
        SeriesInfo("CT", body_part_examined=""),  # Type 3 attribute absent
        SeriesInfo("CT", body_part_examined="CHEST", slices=None),  # geometry unknown
    ],
)
def test_unknown_values_fail_rules_that_need_them(tmp_path: Path, series: SeriesInfo) -> None:
    rules = {"modality": ["CT"], "body_part_examined": ["CHEST"], "slices": {"min": 1}}
    install(tmp_path, classifier(applies_to=rules))
    assert Registry.load(tmp_path).select(series) == []


def test_disabled_models_are_not_selected(tmp_path: Path) -> None:
    install(tmp_path, classifier(), folder="v1")
    install(tmp_path, classifier(version="2.0.0"), folder="v2")
    install(tmp_path, classifier(name="other"))
    ct = SeriesInfo("CT")
    keys = [m.key for m in Registry.load(tmp_path, disabled=["ct-lesion-cnn"]).select(ct)]
    assert keys == ["other@1.0.0"]
    registry = Registry.load(tmp_path, disabled=["ct-lesion-cnn@1.0.0"])
    assert [m.key for m in registry.select(ct)] == ["ct-lesion-cnn@2.0.0", "other@1.0.0"]
    assert [row.enabled for row in registry.describe()] == [False, True, True]


def test_disabling_an_unknown_model_is_an_error(tmp_path: Path) -> None:
    install(tmp_path, classifier())
    assert "disabled_models" in load_error(tmp_path, disabled=["ct-lesion-nn"])


# -- settings and start-up ---------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for key in list(os.environ):
        if key.startswith("PACSNODE_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_settings_default_to_the_bundled_models(clean_env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.models_dir == BUNDLED.resolve()
    assert settings.disabled_models == []


def test_settings_from_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("PACSNODE_MODELS_DIR", str(tmp_path / "models"))
    clean_env.setenv("PACSNODE_DISABLED_MODELS", '["ct-lesion-cnn@1.0.0"]')
    settings = load_settings()
    assert settings.models_dir == tmp_path / "models"
    assert settings.disabled_models == ["ct-lesion-cnn@1.0.0"]


def test_serve_refuses_to_start_with_a_broken_manifest(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    manifest = _nested("applies_to.series_description", "AX(IAL")
    path = install(models_dir, manifest)
    node = Node(
        data_dir=tmp_path / "node",
        database_url=f"sqlite:///{tmp_path / 'index.db'}",
        config=node_config(),
        env_extra={"PACSNODE_MODELS_DIR": str(models_dir)},
    )
    result = node.cli("serve")
    assert result.returncode != 0
    assert str(path) in result.stderr
    assert "applies_to.series_description" in result.stderr
    assert "pacsnode ready" not in result.stdout
    assert not (tmp_path / "index.db").exists()  # stopped before touching the database
