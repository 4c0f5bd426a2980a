"""The TensorFlow side of the models: they learn, save, load and infer.

Training smoke tests run a few dozen steps on tiny synthetic slices made
here (bright discs on noise, 32x32), small enough for CI on 2 cores yet
checked on held-out data in inference mode, the way the node runs them. The
metric functions are checked against small cases computed by hand.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from pacsnode.lab import evaluation, training
from pacsnode.models import architectures, runtime
from pacsnode.models.tf_env import tf

SIZE = 32


def discs(
    n: int, seed: int, *, lesion_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` noisy 32x32 slices, some with one bright disc: (slices, masks, labels)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.2, 0.1, (n, SIZE, SIZE)).astype(np.float32)
    masks = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    labels = np.zeros(n, dtype=np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        if rng.random() < lesion_fraction:
            radius = rng.uniform(3, 7)
            cy, cx = rng.uniform(radius + 1, SIZE - radius - 1, size=2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
            x[i][disc] += rng.uniform(0.5, 0.9)
            masks[i][disc] = 1.0
            labels[i] = 1.0
    return x, masks, labels


def bodies(n: int, seed: int) -> np.ndarray:
    """'Normal' slices for the gate: a bright ellipse of varying size, little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = np.empty((n, SIZE, SIZE), dtype=np.float32)
    for i in range(n):
        ry, rx = rng.uniform(8, 13, size=2)
        inside = ((yy - 15.5) / ry) ** 2 + ((xx - 15.5) / rx) ** 2 < 1
        out[i] = np.where(inside, 0.6, 0.1) + rng.normal(0, 0.02, (SIZE, SIZE))
    return out


def sequences(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Volumes of 4-8 noisy slices; positives hold a disc over 3 neighbouring slices."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    volumes, labels = [], []
    for _ in range(n):
        length = int(rng.integers(4, 9))
        volume = rng.normal(0.2, 0.1, (length, SIZE, SIZE)).astype(np.float32)
        positive = rng.random() < 0.5
        if positive:
            z = int(rng.integers(1, length - 1))
            radius = rng.uniform(3, 6)
            cy, cx = rng.uniform(radius + 1, SIZE - radius - 1, size=2)
            volume[z - 1 : z + 2][:, (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] += 0.8
        volumes.append(volume)
        labels.append(float(positive))
    return volumes, np.array(labels, dtype=np.float32)


def quick(epochs: int = 3, steps: int = 20, **kwargs: Any) -> training.TrainConfig:
    return training.TrainConfig(
        epochs=epochs, steps_per_epoch=steps, batch_size=8, progress=False, **kwargs
    )


SEQUENCE_PARAMS = {"slice_size": SIZE, "depth": 3}


@pytest.fixture(scope="module")
def unet() -> training.TrainResult:
    x, masks, _ = discs(96, seed=1, lesion_fraction=0.8)
    return training.train_unet((x, masks), config=quick())


@pytest.fixture(scope="module")
def classifier() -> training.TrainResult:
    x, _, labels = discs(96, seed=2)
    return training.train_slice_classifier((x, labels), config=quick())


@pytest.fixture(scope="module")
def autoencoder() -> training.TrainResult:
    return training.train_autoencoder(bodies(96, seed=3), config=quick())


# --- training smoke tests ------------------------------------------------------


def test_unet_segments_held_out_discs_in_inference_mode(unet: training.TrainResult) -> None:
    x, masks, _ = discs(24, seed=11, lesion_fraction=1.0)
    model = runtime.LoadedModel(unet.model, spatial_multiple=8)
    result = evaluation.evaluate_segmenter(model, [x], [masks], [(1.0, 0.7, 0.7)])
    assert result.metrics["mean_dice"] > 0.5, result.metrics
    assert math.isfinite(result.metrics["mean_hd95_mm"])
    assert len(unet.history["val_dice"]) == len(unet.history["loss"]) >= 1


def test_classifier_ranks_held_out_slices(classifier: training.TrainResult) -> None:
    x, _, labels = discs(60, seed=12)
    result = evaluation.evaluate_slice_classifier(runtime.LoadedModel(classifier.model), x, labels)
    assert result.metrics["roc_auc"] > 0.8, result.metrics
    assert result.scores is not None and result.scores.shape == (60,)


def test_autoencoder_gate_flags_noise_not_normal_slices(
    autoencoder: training.TrainResult,
) -> None:
    model = runtime.LoadedModel(autoencoder.model, spatial_multiple=8)
    train_errors = runtime.slice_reconstruction_errors(model, bodies(48, seed=3))
    threshold = training.fit_gate_threshold(train_errors)
    rng = np.random.default_rng(13)
    normal = [bodies(6, seed=100 + i) for i in range(5)]
    noise = [rng.uniform(0, 1, (6, SIZE, SIZE)).astype(np.float32) for _ in range(5)]
    result = evaluation.evaluate_gate(model, normal, noise, threshold=threshold)
    assert result.metrics["detection_rate"] == 1.0, result.metrics
    assert result.metrics["false_alarm_rate"] == 0.0, result.metrics
    assert result.scores is not None
    assert max(result.scores[:5]) < min(result.scores[5:])


def test_sequence_classifier_learns_from_volumes_of_different_lengths() -> None:
    volumes, labels = sequences(64, seed=4)
    result = training.train_sequence_classifier(
        (volumes, labels), config=quick(steps=20), params=SEQUENCE_PARAMS
    )
    test_volumes, test_labels = sequences(30, seed=14)
    model = runtime.LoadedModel(result.model)
    scores = runtime.classify_sequences(model, test_volumes)
    assert evaluation.roc_auc(test_labels, scores) > 0.8
    # Padding a volume into a batch with longer ones must not change its score.
    alone = [runtime.classify_sequence(model, v) for v in test_volumes[:4]]
    np.testing.assert_allclose(scores[:4], alone, atol=1e-5)


def test_training_is_reproducible_from_the_seed() -> None:
    x, _, labels = discs(32, seed=5)
    config = quick(epochs=1, steps=4, seed=7)
    first = training.train_slice_classifier((x, labels), config=config)
    second = training.train_slice_classifier((x, labels), config=config)
    np.testing.assert_allclose(first.history["loss"], second.history["loss"], rtol=1e-4)
    for a, b in zip(first.model.weights, second.model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def test_training_takes_a_batch_sampler() -> None:
    def sampler(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        x, _, labels = discs(size, seed=int(rng.integers(1 << 31)))
        return x, labels

    result = training.train_slice_classifier(sampler, config=quick(epochs=2, steps=3))
    assert len(result.history["val_loss"]) == 2
    assert result.best_epoch in (0, 1)


def test_early_stopping_keeps_the_best_weights() -> None:
    x, _, labels = discs(40, seed=6)
    validation = discs(16, seed=16)[0], discs(16, seed=16)[2]
    # A high learning rate makes the validation loss jump between epochs.
    config = quick(epochs=6, steps=4, patience=2, learning_rate=0.05)
    result = training.train_slice_classifier((x, labels), validation=validation, config=config)
    best = min(result.history["val_loss"])
    assert result.history["val_loss"][result.best_epoch] == best
    assert len(result.history["val_loss"]) <= 6
    if result.stopped_early:
        assert len(result.history["val_loss"]) == result.best_epoch + 1 + 2
    scores = runtime.classify_slices(runtime.LoadedModel(result.model), validation[0])
    loss = training.binary_crossentropy(
        tf.constant(validation[1][:, None]), tf.constant(scores[:, None])
    )
    assert float(loss) == pytest.approx(best, rel=1e-4)


# --- augmentation --------------------------------------------------------------


def test_flips_alone_mirror_image_and_mask_exactly() -> None:
    only_flips = training.Augmentation(True, True, 0.0, 0.0, 0.0, 0.0)
    augment = training.Augmenter(only_flips, "image_and_mask", seed=0)
    x, masks, _ = discs(16, seed=7, lesion_fraction=1.0)
    ax, am = augment(tf.constant(x[..., None]), tf.constant(masks[..., None]))
    ax, am = ax.numpy()[..., 0], am.numpy()[..., 0]
    candidates = [lambda a: a, np.fliplr, np.flipud, lambda a: np.flipud(np.fliplr(a))]
    for i in range(16):
        matches = [j for j, f in enumerate(candidates) if np.allclose(ax[i], f(x[i]), atol=1e-5)]
        assert matches, f"slice {i} is not a flip of its input"
        np.testing.assert_array_equal(am[i], candidates[matches[0]](masks[i]))


def test_geometric_augmentation_moves_the_mask_with_the_image() -> None:
    no_noise = training.Augmentation(max_rotation_degrees=20, max_zoom=0.15, noise_std=0.0)
    augment = training.Augmenter(no_noise, "image_and_mask", seed=1)
    x, masks, _ = discs(16, seed=8, lesion_fraction=1.0)
    x = np.where(masks > 0, 1.0, 0.0).astype(np.float32)  # the image is its mask
    ax, am = augment(tf.constant(x[..., None]), tf.constant(masks[..., None]))
    assert not np.allclose(am.numpy(), masks[..., None])  # something moved
    assert evaluation.dice(ax.numpy() > 0.5, am.numpy() > 0.5) > 0.95


def test_sequence_augmentation_keeps_padding_slices_empty() -> None:
    augment = training.Augmenter(training.Augmentation(), "sequence", seed=2)
    volumes, labels = sequences(3, seed=9)
    batch = architectures.pad_volumes([volumes[0][:2], volumes[1]])
    out, _ = augment(tf.constant(batch), tf.constant(labels[:2]))
    assert np.all(out.numpy()[0, 2:] == 0.0)
    assert np.all(np.any(out.numpy()[0, :2] != 0.0, axis=(1, 2, 3)))


# --- runtime ---------------------------------------------------------------------


def test_weights_round_trip_through_the_process_cache(
    unet: training.TrainResult, tmp_path: Path
) -> None:
    path = tmp_path / "unet.weights.h5"
    sha256 = training.save_weights(unet.model, path)
    assert sha256 == runtime.file_sha256(path)
    with h5py.File(path) as f:
        assert not any("optimizer" in name for name in f)
    assert path.stat().st_size < 3_000_000

    runtime.clear_model_cache()
    loaded = runtime.load_model(path, architecture="unet", sha256=sha256)
    assert runtime.load_model(path, architecture="unet", sha256=sha256) is loaded
    volume, _, _ = discs(5, seed=15)
    expected = runtime.segment_volume(runtime.LoadedModel(unet.model, spatial_multiple=8), volume)
    np.testing.assert_allclose(runtime.segment_volume(loaded, volume), expected, atol=1e-6)

    with pytest.raises(runtime.ModelLoadError, match="SHA-256"):
        runtime.load_model(path, architecture="unet", sha256="0" * 64)
    with pytest.raises(runtime.ModelLoadError, match="does not exist"):
        runtime.load_model(tmp_path / "missing.weights.h5", architecture="unet")
    with pytest.raises(runtime.ModelLoadError, match="cannot load"):
        runtime.load_model(path, architecture="autoencoder")


def test_sequence_model_weights_round_trip(tmp_path: Path) -> None:
    model = architectures.build("sequence_classifier", SEQUENCE_PARAMS)
    path = tmp_path / "sequence.weights.h5"
    sha256 = training.save_weights(model, path)
    loaded = runtime.load_model(
        path, architecture="sequence_classifier", params=SEQUENCE_PARAMS, sha256=sha256
    )
    volumes, _ = sequences(3, seed=16)
    np.testing.assert_allclose(
        runtime.classify_sequences(loaded, volumes),
        runtime.classify_sequences(runtime.LoadedModel(model), volumes),
        atol=1e-6,
    )


def test_batched_inference_equals_per_slice_inference(
    classifier: training.TrainResult, unet: training.TrainResult
) -> None:
    x, _, _ = discs(19, seed=17)
    slice_model = runtime.LoadedModel(classifier.model)
    batched = runtime.classify_slices(slice_model, x, batch_size=8)
    single = runtime.classify_slices(slice_model, x, batch_size=1)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    seg_model = runtime.LoadedModel(unet.model, spatial_multiple=8)
    np.testing.assert_allclose(
        runtime.segment_volume(seg_model, x, batch_size=16),
        runtime.segment_volume(seg_model, x, batch_size=1),
        atol=1e-5,
    )


def test_segment_volume_pads_and_crops_sizes_the_unet_cannot_take() -> None:
    model = runtime.LoadedModel(architectures.build_unet(), spatial_multiple=8)
    out = runtime.segment_volume(model, np.zeros((3, 30, 27), dtype=np.float32))
    assert out.shape == (3, 30, 27)
    assert out.dtype == np.float32
    empty = np.zeros((0, 30, 27), dtype=np.float32)
    assert runtime.segment_volume(model, empty).shape == (0, 30, 27)
    classifier = runtime.LoadedModel(architectures.build_slice_classifier())
    assert runtime.classify_slices(classifier, empty).shape == (0,)


def test_wrong_input_shape_is_a_clear_error() -> None:
    model = runtime.LoadedModel(architectures.build_slice_classifier(input_size=SIZE))
    with pytest.raises(runtime.ModelInputError, match=r"expected \(32, 32, 1\)"):
        runtime.classify_slices(model, np.zeros((2, 16, 16), dtype=np.float32))


def test_node_processes_do_not_import_tensorflow() -> None:
    code = (
        "import sys, pacsnode.cli, pacsnode.serve, pacsnode.scp.server, pacsnode.db.session, "
        "pacsnode.workers.tasks, pacsnode.lab.evaluation; "
        "print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "False"


# --- metrics against hand-computed cases ----------------------------------------


def test_dice_of_known_masks() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :4] = True  # 4 voxels
    b[0, 1:4] = True  # 3 of them ...
    b[1, :3] = True  # ... plus 3 others: 6 voxels
    assert evaluation.dice(a, b) == pytest.approx(2 * 3 / (4 + 6))
    assert evaluation.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert evaluation.dice(a, np.zeros_like(a)) == 0.0


@pytest.mark.parametrize(
    ("axis", "offset", "spacing", "expected_mm"),
    [(0, 3, (2.5, 0.7, 0.7), 7.5), (2, 4, (3.0, 1.0, 0.6), 2.4), (1, 2, (1.0, 0.8, 0.5), 1.6)],
)
def test_hd95_of_parallel_planes_uses_the_spacing_of_each_axis(
    axis: int, offset: int, spacing: tuple[float, float, float], expected_mm: float
) -> None:
    """Two one-voxel-thick planes: every surface distance is offset x spacing."""
    a = np.zeros((8, 8, 8), bool)
    b = np.zeros((8, 8, 8), bool)
    a[(slice(None),) * axis + (1,)] = True
    b[(slice(None),) * axis + (1 + offset,)] = True
    assert evaluation.hausdorff95(a, b, spacing) == pytest.approx(expected_mm)
    assert evaluation.hausdorff95(b, a, spacing) == pytest.approx(expected_mm)


def test_hd95_of_offset_cubes_matches_brute_force_with_anisotropic_spacing() -> None:
    spacing = (2.5, 0.8, 0.6)
    a = np.zeros((12, 14, 14), bool)
    b = np.zeros_like(a)
    a[2:7, 3:9, 3:9] = True
    b[4:9, 4:10, 5:11] = True

    def surface_points(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.array(spacing)

    pa, pb = surface_points(a), surface_points(b)
    distances = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    pooled = np.concatenate([distances.min(axis=1), distances.min(axis=0)])
    expected = np.percentile(pooled, 95)
    assert expected > 0
    assert evaluation.hausdorff95(a, b, spacing) == pytest.approx(expected)


def test_hd95_of_empty_masks() -> None:
    empty = np.zeros((3, 3, 3), bool)
    full = np.ones((3, 3, 3), bool)
    assert evaluation.hausdorff95(empty, empty, (1, 1, 1)) == 0.0
    assert evaluation.hausdorff95(full, empty, (1, 1, 1)) == math.inf


def test_binary_metrics_of_a_small_case() -> None:
    labels = [1, 1, 0, 0, 1]
    scores = [0.9, 0.4, 0.2, 0.6, 0.8]  # tp 2, fn 1 (0.4), fp 1 (0.6), tn 1
    m = evaluation.binary_metrics(labels, scores, threshold=0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["recall"] == m["sensitivity"]
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # Ranking: positives 0.9, 0.8, 0.4 against negatives 0.6, 0.2: 5 of 6 pairs right.
    assert m["roc_auc"] == pytest.approx(5 / 6)


def test_roc_auc_of_perfect_reversed_and_one_class_rankings() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    assert evaluation.roc_auc(labels, np.array([0.1, 0.2, 0.7, 0.8, 0.9])) == 1.0
    assert evaluation.roc_auc(labels, np.array([0.9, 0.8, 0.3, 0.2, 0.1])) == 0.0
    assert math.isnan(evaluation.roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3])))


def test_gate_rates() -> None:
    rates = evaluation.gate_rates(np.array([0.1, 0.2, 0.5, 0.1]), np.array([0.6, 0.3, 0.9]), 0.4)
    assert rates["false_alarm_rate"] == pytest.approx(1 / 4)
    assert rates["detection_rate"] == pytest.approx(2 / 3)


def test_segmentation_case_volumes_in_mm3() -> None:
    truth = np.zeros((4, 4, 4), bool)
    truth[1:3, 1:3, 1:3] = True  # 8 voxels
    probabilities = truth.astype(np.float32) * 0.9
    probabilities[0, 0, 0] = 0.7  # one false-positive voxel
    case = evaluation.segmentation_case(probabilities, truth, (2.0, 0.5, 0.5))
    assert case["true_volume_mm3"] == pytest.approx(8 * 0.5)
    assert case["predicted_volume_mm3"] == pytest.approx(9 * 0.5)
    assert case["volume_error"] == pytest.approx(1 / 8)


def test_write_report_writes_json_and_curves(tmp_path: Path) -> None:
    result = evaluation.Evaluation(
        model="demo-classifier",
        task="classification",
        metrics=evaluation.binary_metrics([1, 0, 1, 0], [0.8, 0.3, 0.6, 0.7]),
        labels=np.array([1, 0, 1, 0]),
        scores=np.array([0.8, 0.3, 0.6, 0.7]),
        cases=[{"hd95_mm": math.inf}],
    )
    paths = evaluation.write_report(result, tmp_path / "report")
    assert sorted(p.name for p in paths) == ["pr.png", "report.json", "roc.png"]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["metrics"]["roc_auc"] == pytest.approx(0.75)
    assert report["cases"] == [{"hd95_mm": None}]
    assert "not clinical use" in report["note"]
    assert (tmp_path / "report" / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_manifest_knows_every_architecture() -> None:
    """models/manifest.py lists the architecture names without importing
    TensorFlow; the two lists must stay equal."""
    from typing import get_args

    from pacsnode.models.architectures import ARCHITECTURES
    from pacsnode.models.manifest import ArchitectureName

    assert set(get_args(ArchitectureName)) == set(ARCHITECTURES)
