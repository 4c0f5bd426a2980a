"""How each bundled model is trained: ``pacsnode train MODEL``.

The bundled models are trained on synthetic phantoms and are for
demonstration, not clinical use. One recipe per model:

- ``ct-ood-gate`` (anomaly, autoencoder): trained on normal CT slices only;
  its threshold is :func:`models.training.fit_gate_threshold` of the
  reconstruction errors of its training volumes. Gate of the three others.
- ``ct-lesion-classifier`` (classification, slice_classifier): lesion
  presence, trained on 64² patches (40 % around a lesion, most others inside
  the body; positive with at least 22.5 mm² of lesion in the patch,
  negative with none), run on whole slices (a max-pooled map of logits); the
  node scores a study by the maximum over its slices, and the study
  threshold is fitted on whole validation studies.
- ``ct-lesion-segmenter`` (segmentation, unet): 64² patches with their
  masks (a third around a lesion, most others inside the body), Dice +
  cross-entropy loss; a second round adds patches around the first round's
  false positives on whole training volumes (hard negatives).
- ``ct-lesion-sequence`` (sequence, sequence_classifier): a per-slice encoder
  is first trained as the slice classifier is, then frozen (with its logit
  map), and the bidirectional GRU learns the study label from the whole
  slice sequence.

Input specs. The classifier, the segmenter and the gate share
:func:`ct_spec` (4 mm slices, 1.5 mm pixels, window 40/400 HU), so the node
preprocesses a series once for the three: a 200 x 512² CT at 0.78 mm / 2 mm
becomes 100 x 267². 1.5 mm keeps the smallest lesions (5 mm) a few pixels
wide; 4 mm slices still cut every lesion at least once. The sequence model
reads the same grid cut to a fixed 100 x 256² (384 mm field of view),
:func:`sequence_spec`.

Reproducible: data seeds are fixed (:mod:`models.recipe_data`), the training
seed fixes initialisation, order and augmentation. Weights are written to
``<out>/<name>/<name>.weights.h5`` with ``manifest.yaml`` (carrying the
weights' SHA-256) and ``training.json`` (history, thresholds, timings).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.progress import Progress

from pacsnode.core.layout import atomic_write
from pacsnode.lab import recipe_data as data
from pacsnode.models.inputspec import PreprocessSpec
from pacsnode.models.manifest import ModelManifest, read_manifest
from pacsnode.models.registry import sha256_of
from pacsnode.workers.preprocess import preprocess

VERSION = "1.0.0"
GATE = "ct-ood-gate"
WINDOW = (40.0, 400.0)  # soft-tissue window, HU
DESCRIPTION = "Trained on pacsnode's synthetic phantoms; for demonstration, not clinical use."
LESION = {"value": "52988006", "scheme_designator": "SCT", "meaning": "Lesion"}
ALTERED = {
    "value": "49755003",
    "scheme_designator": "SCT",
    "meaning": "Morphologically Altered Structure",
}


@dataclass(frozen=True)
class Scale:
    """Grid, data and network sizes of a recipe run. :data:`FULL` trains the
    bundled models; :data:`TINY` is for smoke tests (minutes become seconds)."""

    pixel_mm: float = 1.5
    slice_mm: float = 4.0
    size: int = 256  # training slices, pixels (384 mm)
    slices: int = 100  # 400 mm
    seq_size: int = 256
    train_studies: int = 48
    seq_train_studies: int = 96
    gate_train_studies: int = 32
    val_studies: int = 16
    patch: int = 64  # U-Net training patches
    classifier_patch: int = 64
    base_filters: int = 16  # U-Net and autoencoder
    classifier_filters: int = 8
    classifier_depth: int = 4
    steps: float = 1.0  # multiplies every recipe's default step count

    @property
    def grid(self) -> data.CtGrid:
        return data.CtGrid(self.size, self.slices, self.pixel_mm, self.slice_mm)


FULL = Scale()
TINY = Scale(
    pixel_mm=8.0, slice_mm=16.0, size=48, slices=25, seq_size=48,
    train_studies=6, seq_train_studies=6, gate_train_studies=3, val_studies=4, patch=32,
    classifier_patch=32, base_filters=4, classifier_filters=4, classifier_depth=2, steps=0.02,
)  # fmt: skip


def ct_spec(scale: Scale = FULL) -> PreprocessSpec:
    """The input spec the classifier, the segmenter and the gate share."""
    return PreprocessSpec(
        target_spacing=(scale.slice_mm, scale.pixel_mm, scale.pixel_mm),
        normalise="window",
        window=WINDOW,
    )


def sequence_spec(scale: Scale = FULL) -> PreprocessSpec:
    """The sequence model's spec: the classifier's grid cut to fixed 256²
    slices (it needs a fixed slice size) over 384 mm, and 100 slices over
    400 mm, centred; missing slices are padded with air, which the model
    masks out."""
    return PreprocessSpec(
        target_spacing=(scale.slice_mm, scale.pixel_mm, scale.pixel_mm),
        target_shape=(scale.slices, scale.seq_size, scale.seq_size),
        normalise="window",
        window=WINDOW,
    )


@dataclass
class Trained:
    """What a recipe's training function hands back."""

    model: Any  # keras.Model
    thresholds: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    task: str
    summary: str
    architecture: str
    params: Callable[[Scale], dict[str, Any]]
    spec: Callable[[Scale], PreprocessSpec]
    shape: Callable[[Scale], list[int]]
    batch_size: int
    default_steps: int
    train: Callable[[Scale, int, int, bool], Trained]  # scale, seed, steps, progress
    outputs: list[dict[str, Any]]
    gate: str | None = GATE


class _Dumper(yaml.SafeDumper):
    """Writes repeated codes out in full, not as YAML anchors and aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@dataclass(frozen=True)
class Written:
    folder: Path
    manifest: Path
    weights: Path
    sha256: str
    seconds: float
    weights_bytes: int


# --- helpers -------------------------------------------------------------------


@contextmanager
def _data_progress(label: str, total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    with Progress(disable=not enabled, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda: progress.advance(task)


def _config(
    steps: int, epochs: int, batch_size: int, seed: int, progress: bool, label: str, **kw: Any
) -> Any:
    from pacsnode.lab.training import TrainConfig

    epochs = max(1, min(epochs, steps))
    return TrainConfig(
        epochs=epochs,
        steps_per_epoch=math.ceil(steps / epochs),
        batch_size=batch_size,
        seed=seed,
        patience=4,
        progress=progress,
        description=label,
        **kw,
    )


def _studies(
    scale: Scale,
    first: int,
    count: int,
    lesions: Callable[[int], int | None],
    noise: Callable[[int], float],
    label: str,
    progress: bool,
) -> list[Any]:
    seeds = range(first, first + count)
    with _data_progress(label, count, progress) as advance:
        return list(data.generate_studies(scale.grid, seeds, lesions, noise, progress=advance))


def _train_studies(scale: Scale, count: int, progress: bool) -> list[Any]:
    return _studies(
        scale, data.TRAIN_SEED, count, data.lesion_schedule, data.noise_for,
        "phantoms (training)", progress,
    )  # fmt: skip


def _val_studies(scale: Scale, progress: bool) -> list[Any]:
    return _studies(
        scale, data.VALIDATION_SEED, scale.val_studies,
        lambda seed: None if seed % 2 == 0 else 0, data.noise_for, "phantoms (validation)",
        progress,
    )  # fmt: skip


def _lesion_slice_sets(
    scale: Scale, spec: PreprocessSpec, studies: int, size: int, progress: bool
) -> tuple[data.SliceSet, data.SliceSet]:
    """Training (``studies`` phantoms, three in four with lesions) and
    validation slices with their lesion masks, preprocessed by ``spec``."""
    train_set = data.ct_slices(
        _train_studies(scale, studies, progress), spec, size=size, keep_masks=True
    )
    val_set = data.ct_slices(_val_studies(scale, progress), spec, size=size, keep_masks=True)
    return train_set, val_set


def fit_positive_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The study threshold with the largest Youden index (sensitivity +
    specificity - 1) on validation scores, midway between neighbouring scores."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.all() or not labels.any():
        return 0.5
    values = np.unique(scores)
    cuts = np.concatenate([[values[0] / 2], (values[:-1] + values[1:]) / 2, [(values[-1] + 1) / 2]])
    best, best_j = 0.5, -math.inf
    for cut in cuts:
        predicted = scores >= cut
        j = predicted[labels].mean() + (~predicted[~labels]).mean() - 1
        if j > best_j + 1e-12 or (abs(j - best_j) <= 1e-12 and abs(cut - 0.5) < abs(best - 0.5)):
            best, best_j = float(cut), float(j)
    return float(np.clip(round(best, 4), 0.001, 0.999))


def _history(result: Any) -> dict[str, Any]:
    return {
        "history": result.history,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 1),
    }


def _steps(scale: Scale, steps: int | None, default: int) -> int:
    return max(1, steps if steps is not None else round(default * scale.steps))


# --- the gate ----------------------------------------------------------------------


def _gate_params(scale: Scale) -> dict[str, Any]:
    return {"base_filters": scale.base_filters, "depth": 3, "latent_channels": 8}


def _train_gate(scale: Scale, seed: int, steps: int, progress: bool) -> Trained:
    from pacsnode.lab import training
    from pacsnode.models import architectures, runtime

    normal = _studies(
        scale, data.GATE_TRAIN_SEED, scale.gate_train_studies, lambda s: 0, data.noise_for,
        "phantoms (normal CT)", progress,
    )  # fmt: skip
    val = [s for s in _val_studies(scale, progress) if not s.lesions]
    spec = ct_spec(scale)
    train_set = data.ct_slices(normal, spec, size=scale.size, keep_masks=False)
    val_set = data.ct_slices(val, spec, size=scale.size, keep_masks=False)
    batch = 8
    config = _config(steps, 10, batch, seed, progress, "ct-ood-gate")
    validation = data.draw(data.random_slices(val_set), seed, 8, batch)[0]
    result = training.train_autoencoder(
        data.random_slices(train_set), validation=validation, config=config,
        params=_gate_params(scale),
    )  # fmt: skip
    params = _gate_params(scale)
    loaded = runtime.LoadedModel(
        result.model, spatial_multiple=architectures.spatial_multiple("autoencoder", params)
    )
    errors = [
        runtime.reconstruction_error(loaded, preprocess(data.volume_of(s.series["CT"]), spec))
        for s in normal
    ]
    threshold = training.fit_gate_threshold(np.array(errors))
    val_errors = [
        runtime.reconstruction_error(loaded, val_set.study_slices(i)) for i in range(len(val))
    ]
    info = _history(result) | {
        "training_volume_errors": [round(e, 6) for e in errors],
        "validation_volume_errors": [round(e, 6) for e in val_errors],
    }
    return Trained(result.model, {"ood_reconstruction_error": round(threshold, 6)}, info)


# --- the slice classifier ----------------------------------------------------------


def _classifier_params(scale: Scale) -> dict[str, Any]:
    # Max pooling of a map of logits: each cell of the last feature map (16 x
    # 16 px, 24 mm, with a receptive field of about 90 mm) is classified and
    # the slice is as positive as its most suspicious cell. Trained on 64²
    # patches, the same cells give the same evidence on a whole slice; with
    # global average pooling a small lesion was diluted by the slice's size.
    return {
        "base_filters": scale.classifier_filters,
        "depth": scale.classifier_depth,
        "dropout": 0.2,
        "pooling": "max",
    }


def _study_threshold(loaded: Any, val_set: data.SliceSet) -> tuple[float, dict[str, Any]]:
    from pacsnode.lab import evaluation
    from pacsnode.models import runtime

    scores = np.array(
        [
            float(np.max(runtime.classify_slices(loaded, val_set.study_slices(i))))
            for i in range(val_set.studies)
        ]
    )
    threshold = fit_positive_threshold(val_set.study_labels, scores)
    metrics = evaluation.binary_metrics(val_set.study_labels, scores, threshold=threshold)
    return threshold, {"validation_studies": metrics}


def _slice_classifier(
    params: dict[str, Any], train_set: data.SliceSet, val_set: data.SliceSet, pixel_mm: float,
    patch: int, batch: int, seed: int, steps: int, progress: bool, label: str,
) -> Any:  # fmt: skip
    """A slice classifier trained on ``patch``² crops, half of them around a
    lesion: one label per whole slice taught it too slowly (a small lesion
    barely moves a global average over a slice). Its max-pooled logit map
    makes it run on whole slices; the study threshold is fitted there."""
    from pacsnode.lab import training

    k = data.min_voxels(pixel_mm)
    return training.train_slice_classifier(
        data.labelled_patches(train_set, patch, k),
        validation=data.draw(data.labelled_patches(val_set, patch, k), seed, 8, batch),
        config=_config(steps, 10, batch, seed, progress, label),
        params=params,
    )


def _train_classifier(scale: Scale, seed: int, steps: int, progress: bool) -> Trained:
    from pacsnode.models import runtime

    spec = ct_spec(scale)
    train_set, val_set = _lesion_slice_sets(scale, spec, scale.train_studies, scale.size, progress)
    result = _slice_classifier(
        _classifier_params(scale), train_set, val_set, scale.pixel_mm, scale.classifier_patch,
        32, seed, steps, progress, "ct-lesion-classifier",
    )  # fmt: skip
    threshold, info = _study_threshold(runtime.LoadedModel(result.model), val_set)
    return Trained(result.model, {"positive": threshold}, _history(result) | info)


# --- the segmenter -----------------------------------------------------------------


def _unet_params(scale: Scale) -> dict[str, Any]:
    return {"base_filters": scale.base_filters, "depth": 3}


def _false_positives(model: Any, data_set: data.SliceSet, multiple: int) -> np.ndarray:
    """Voxels (slice index, y, x) where ``model`` marks lesion and none is:
    at most 500 per study, so every study's look-alikes are represented."""
    from pacsnode.models import runtime

    assert data_set.masks is not None
    loaded = runtime.LoadedModel(model, spatial_multiple=multiple)
    rng = np.random.default_rng(0)
    found = []
    for i in range(data_set.studies):
        index = np.flatnonzero(data_set.study == i)
        p = runtime.segment_volume(loaded, data_set.x[index].astype(np.float32))
        z, y, x = np.nonzero((p >= 0.5) & ~data_set.masks[index])
        keep = rng.permutation(len(z))[:500]
        found.append(np.stack([index[z[keep]], y[keep], x[keep]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 3), np.int64)


def _train_segmenter(scale: Scale, seed: int, steps: int, progress: bool) -> Trained:
    """Two rounds: patches as :func:`models.recipe_data.lesion_patches` draws
    them; then, from the first model's false positives on the whole training
    volumes (hard negatives: kidney poles, vessels, organ edges that look like
    lesions on one slice), a share of patches centred on them. Patch Dice was
    0.97 after one round while whole volumes still had confident false
    positives in every normal study: a volume has thousands of patch positions
    and random patches meet its rare look-alikes too seldom."""
    from pacsnode.lab import training
    from pacsnode.models import architectures

    spec = ct_spec(scale)
    train_set, val_set = _lesion_slice_sets(scale, spec, scale.train_studies, scale.size, progress)
    batch = 32
    params = _unet_params(scale)
    kw: dict[str, Any] = {"lesion_fraction": 0.35, "body_fraction": 0.8}
    validation = data.draw(data.lesion_patches(val_set, scale.patch, **kw), seed, 8, batch)
    first_steps = max(1, round(steps * 0.6))
    first = training.train_unet(
        data.lesion_patches(train_set, scale.patch, **kw),
        validation=validation,
        config=_config(first_steps, 8, batch, seed, progress, "ct-lesion-segmenter"),
        params=params,
    )
    hard = _false_positives(first.model, train_set, architectures.spatial_multiple("unet", params))
    second = training.train_unet(
        data.lesion_patches(train_set, scale.patch, **kw, hard=hard, hard_fraction=0.5),
        validation=validation,
        config=_config(
            max(1, steps - first_steps), 6, batch, seed + 1, progress,
            "ct-lesion-segmenter (hard negatives)", learning_rate=3e-4,
        ),
        model=first.model,
    )  # fmt: skip
    info = _history(second) | {"first_round": _history(first), "hard_negatives": len(hard)}
    return Trained(second.model, {"mask": 0.5}, info)


# --- the sequence classifier -------------------------------------------------------


def _sequence_params(scale: Scale) -> dict[str, Any]:
    return {
        "slice_size": scale.seq_size,
        "base_filters": scale.classifier_filters,
        "depth": scale.classifier_depth,
        "features": 32,
        "rnn_units": 32,
        "dropout": 0.2,
        "pooling": "max",
    }


def _frozen_features(classifier: Any, depth: int) -> Callable[[np.ndarray], np.ndarray]:
    """A volume ``(T, S, S)`` → ``(T, 2F + 1)``: per slice, the max and mean of
    a max-pooling slice classifier's last feature maps and its slice logit, as
    the sequence model's frozen part computes them; all-zero (padding) slices
    give all-zero rows, as the sequence model masks them."""
    from pacsnode.models.tf_env import keras

    maps = classifier.get_layer(f"features_pool{depth - 1}").output
    pooled = keras.layers.Concatenate()(
        [keras.layers.GlobalMaxPooling2D()(maps), keras.layers.GlobalAveragePooling2D()(maps)]
    )
    logit = keras.layers.GlobalMaxPooling2D()(classifier.get_layer("logit_map").output)
    extractor = keras.Model(classifier.inputs, keras.layers.Concatenate()([pooled, logit]))

    def extract(volume: np.ndarray) -> np.ndarray:
        x = np.asarray(volume, np.float32)[..., np.newaxis]
        out = np.asarray(extractor.predict(x, batch_size=16, verbose=0), np.float32)
        out[np.abs(x).reshape(len(x), -1).max(axis=1) == 0] = 0.0
        return out

    return extract


def _train_sequence(scale: Scale, seed: int, steps: int, progress: bool) -> Trained:
    from pacsnode.lab import evaluation
    from pacsnode.models import architectures, runtime
    from pacsnode.models.tf_env import keras

    spec = sequence_spec(scale)
    slices, val_slices = _lesion_slice_sets(
        scale, spec, scale.seq_train_studies, scale.seq_size, progress
    )
    # Stage 1: the per-slice encoder, trained as the slice classifier is.
    encoder = _slice_classifier(
        _classifier_params(scale), slices, val_slices, scale.pixel_mm,
        scale.classifier_patch, 32, seed, steps * 25, progress, "ct-lesion-sequence encoder",
    )  # fmt: skip
    # Stage 2: that encoder and its logit map, frozen, under a bidirectional
    # GRU over the slices. The frozen part runs once per study; the GRU head
    # trains on its features (layers named as in the full model), then its
    # weights are copied into the full model.
    keras.utils.set_random_seed(seed)
    params = _sequence_params(scale)
    model = architectures.build_sequence_classifier(**params)
    for layer in model.layers:
        if layer.name.startswith("features_block") or layer.name == "logit_map":
            source = encoder.model.get_layer(layer.name)
            layer.set_weights([v.numpy() for v in source.weights])
            layer.trainable = False
    volumes = [slices.x[slices.study == i] for i in range(slices.studies)]
    val_volumes = [val_slices.study_slices(i) for i in range(val_slices.studies)]
    extract = _frozen_features(encoder.model, scale.classifier_depth)
    train_x = np.stack([extract(v) for v in volumes])
    val_x = np.stack([extract(v) for v in val_volumes])
    head = architectures.build_sequence_head(
        train_x.shape[-1] - 1, features=params["features"], rnn_units=params["rnn_units"],
        dropout=params["dropout"],
    )  # fmt: skip
    head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    stop = keras.callbacks.EarlyStopping(patience=15, restore_best_weights=True)
    fitted = head.fit(
        train_x, slices.study_labels, batch_size=8, epochs=max(1, steps), shuffle=True,
        validation_data=(val_x, val_slices.study_labels), callbacks=[stop], verbose=0,
    )  # fmt: skip
    for name in ("features_dense", "bigru", "logit"):
        model.get_layer(name).set_weights(head.get_layer(name).get_weights())
    scores = runtime.classify_sequences(runtime.LoadedModel(model), val_volumes)
    threshold = fit_positive_threshold(val_slices.study_labels, scores)
    history = {k: [float(v) for v in vs] for k, vs in fitted.history.items()}
    info = {
        "history": history,
        "best_epoch": int(np.argmin(history["val_loss"])),
        "encoder": _history(encoder),
        "validation_studies": evaluation.binary_metrics(
            val_slices.study_labels, scores, threshold=threshold
        ),
    }
    return Trained(model, {"positive": threshold}, info)


# --- the recipes -------------------------------------------------------------------


def _shared_shape(scale: Scale) -> list[int]:
    return [scale.size, scale.size]


def _sequence_shape(scale: Scale) -> list[int]:
    return [scale.seq_size, scale.seq_size]


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            GATE, "anomaly",
            "Convolutional autoencoder trained on normal CT slices; a reconstruction error "
            "above its threshold flags a series as out of distribution for the CT lesion models.",
            "autoencoder", _gate_params, ct_spec, _shared_shape, 16, 240, _train_gate, [], None,
        ),
        Recipe(
            "ct-lesion-segmenter", "segmentation",
            "2D U-Net segmenting lesions slice by slice into a 3D mask.",
            "unet", _unet_params, ct_spec, _shared_shape, 8, 2000, _train_segmenter,
            [{"name": "lesion", "concept": LESION,
              "segment": {"category": ALTERED, "type": LESION}}],
        ),
        Recipe(
            "ct-lesion-classifier", "classification",
            "2D CNN giving a lesion probability per CT slice; the study's probability is the "
            "maximum over its slices.",
            "slice_classifier", _classifier_params, ct_spec, _shared_shape, 16, 3000,
            _train_classifier, [{"name": "lesion", "concept": LESION}],
        ),
        Recipe(
            "ct-lesion-sequence", "sequence",
            "Study-level lesion classifier: a per-slice CNN encoder and a bidirectional GRU "
            "over the CT slices.",
            "sequence_classifier", _sequence_params, sequence_spec, _sequence_shape, 4, 120,
            _train_sequence, [{"name": "lesion", "concept": LESION}],
        ),
    )
}  # fmt: skip


def manifest_data(
    recipe: Recipe, scale: Scale, sha256: str, thresholds: dict[str, float]
) -> dict[str, Any]:
    """The manifest of a trained model as plain data (validated before writing)."""
    manifest: dict[str, Any] = {
        "manifest_version": 1,
        "name": recipe.name,
        "version": VERSION,
        "task": recipe.task,
        "description": f"{recipe.summary} {DESCRIPTION}",
        "applies_to": {"modality": ["CT"]},
        "input": {
            "preprocess": recipe.spec(scale).model_dump(mode="json", exclude_defaults=True),
            "shape": recipe.shape(scale),
            "channels": 1,
            "batch_size": recipe.batch_size,
        },
        "outputs": recipe.outputs,
        "thresholds": thresholds,
    }
    if recipe.gate is not None:
        manifest["gate"] = recipe.gate
    manifest["architecture"] = {"name": recipe.architecture, "params": recipe.params(scale)}
    manifest["weights"] = {"file": f"{recipe.name}.weights.h5", "sha256": sha256}
    ModelManifest.model_validate(manifest)
    return manifest


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def train_model(
    name: str,
    out_dir: str | Path,
    *,
    steps: int | None = None,
    seed: int = 0,
    scale: Scale = FULL,
    progress: bool = True,
) -> Written:
    """Train one bundled model by its recipe and install it in ``out_dir/name``:
    weights, manifest (with the weights' SHA-256) and ``training.json``."""
    from pacsnode.lab.training import save_weights

    try:
        recipe = RECIPES[name]
    except KeyError:
        raise ValueError(f"no recipe for {name!r} (known: {', '.join(RECIPES)})") from None
    started = time.monotonic()
    n_steps = _steps(scale, steps, recipe.default_steps)
    trained = recipe.train(scale, seed, n_steps, progress)
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.weights.h5"
    sha256 = save_weights(trained.model, weights)
    manifest = manifest_data(recipe, scale, sha256, trained.thresholds)
    header = (
        f"# {name} {VERSION}: written by `pacsnode train {name}` (seed {seed}, {n_steps} steps).\n"
        "# Trained on synthetic phantoms (models/recipes.py); for demonstration, not clinical "
        "use.\n"
    )
    manifest_path = folder / "manifest.yaml"
    _write_text(
        manifest_path, header + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=100)
    )
    checked = read_manifest(manifest_path)
    if sha256_of(weights) != checked.weights.sha256:  # pragma: no cover - a race with a writer
        raise RuntimeError(f"{weights} changed while its manifest was written")
    seconds = time.monotonic() - started
    record = {
        "model": name,
        "version": VERSION,
        "seed": seed,
        "steps": n_steps,
        "scale": "full" if scale == FULL else "custom",
        "seconds": round(seconds, 1),
        "weights_sha256": sha256,
        "thresholds": trained.thresholds,
        "data_seeds": {
            "training": f"from {data.TRAIN_SEED}",
            "gate_training": f"from {data.GATE_TRAIN_SEED}",
            "validation": f"from {data.VALIDATION_SEED}",
            "held_out": f"from {data.HELD_OUT_SEED} (pacsnode evaluate)",
        },
        **trained.info,
    }
    from pacsnode.lab.evaluation import _jsonable

    _write_text(folder / "training.json", json.dumps(_jsonable(record), indent=2) + "\n")
    for path in (weights, manifest_path, folder / "training.json"):
        path.chmod(0o644)  # temporary files are private; a node may run as another user
    return Written(folder, manifest_path, weights, sha256, seconds, weights.stat().st_size)


def tiny(scale: Scale = TINY, **changes: Any) -> Scale:
    """A variant of a scale (tests)."""
    return replace(scale, **changes)
