"""Training the bundled CT+PT fusion model (``pacsnode train ct-pt-avid-fusion``).

Synthetic phantoms only (models/fusion_recipe.py); the model is for
demonstration, not clinical use.

One network, three heads (models.architectures.build_fusion_classifier):
CT-only, PT-only and feature-level fused, each trained on "this slice holds
an FDG-avid lesion" with its own binary cross-entropy. Batches are half
positive slices, flipped at random (both channels alike). AdamW with cosine
decay and BatchNorm momentum 0.9 (with the default 0.99, short runs give
models that fail in inference mode); validation runs in inference mode.
On the validation studies the decision-level weights (CT head, PT head)
are fitted, and the threshold of the reported probability.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pacsnode.lab import fusion_recipe as recipe
from pacsnode.lab.recipes import DESCRIPTION, Written, _Dumper, _write_text, fit_positive_threshold
from pacsnode.models.manifest import ModelManifest, read_manifest
from pacsnode.models.tf_env import keras, tf


def _batch(
    x: np.ndarray, cells: np.ndarray, y: np.ndarray, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    positive, negative = np.flatnonzero(y), np.flatnonzero(~y)
    half = size // 2 if len(positive) else 0
    index = np.concatenate([rng.choice(positive, half), rng.choice(negative, size - half)]).astype(
        np.int64
    )
    bx, bc = x[index].copy(), cells[index].copy()
    for axis in (1, 2):
        flip = rng.random(size) < 0.5
        bx[flip] = np.flip(bx[flip], axis=axis)
        bc[flip] = np.flip(bc[flip], axis=axis)
    return bx, bc.astype(np.float32)[..., None]


def _head_loss(cells: Any, logit_map: Any) -> Any:
    """Dense cell targets (a lesion is small: positives weigh POSITIVE_WEIGHT)
    plus the slice target through the max over cells, as inference sees it."""
    per_cell = tf.nn.weighted_cross_entropy_with_logits(cells, logit_map, POSITIVE_WEIGHT)
    slice_y = tf.reduce_max(cells, axis=(1, 2, 3))
    slice_logit = tf.reduce_max(logit_map, axis=(1, 2, 3))
    per_slice = tf.nn.sigmoid_cross_entropy_with_logits(slice_y, slice_logit)
    return tf.reduce_mean(per_cell) + tf.reduce_mean(per_slice)


POSITIVE_WEIGHT = 10.0


def train(
    scale: recipe.FusionScale, seed: int, steps: int, progress: bool
) -> tuple[Any, dict[str, Any]]:
    """The trained model and what training.json records."""
    from pacsnode.models.architectures import (
        FUSION_HEADS,
        build_fusion_classifier,
        spatial_multiple,
    )

    started = time.monotonic()
    train_cases = recipe.cases(scale, recipe.FUSION_TRAIN_SEED, scale.train_studies)
    val_cases = recipe.cases(scale, recipe.FUSION_VALIDATION_SEED, scale.val_studies)
    data_s = time.monotonic() - started
    x = np.concatenate([c.stack for c in train_cases]).astype(np.float32)
    cells = np.concatenate([c.cell_labels for c in train_cases if c.cell_labels is not None])
    y = np.concatenate([c.slice_labels for c in train_cases])
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_fusion_classifier(**recipe.params(scale))
    # The same layers, answering with each head's logit map (dense training).
    maps = keras.Model(
        model.inputs, [model.get_layer(f"{head}_logit_map").output for head in FUSION_HEADS]
    )
    schedule = keras.optimizers.schedules.CosineDecay(2e-3, decay_steps=max(1, steps), alpha=0.01)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=1e-4)
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])

    @tf.function
    def step(bx: Any, bc: Any) -> Any:
        with tf.GradientTape() as tape:
            outputs = maps(bx, training=True)
            loss = tf.add_n([_head_loss(bc, logit_map) for logit_map in outputs])
        grads = tape.gradient(loss, maps.trainable_variables)
        optimizer.apply_gradients(zip(grads, maps.trainable_variables, strict=True))
        return loss

    losses = []
    for i in range(steps):
        bx, bc = _batch(x, cells, y, rng, scale.batch_size)
        losses.append(float(step(tf.constant(bx), tf.constant(bc))))
        if progress and (i + 1) % 100 == 0:
            print(f"step {i + 1}/{steps} loss {np.mean(losses[-100:]):.4f}", flush=True)
    train_s = time.monotonic() - started - data_s
    multiple = spatial_multiple("fusion_classifier", recipe.params(scale))
    val_p = recipe.predict_cases(model, val_cases, multiple)
    weights = recipe.fit_decision_weights(val_cases, val_p)
    scores = recipe.variant_scores(val_cases, val_p, weights)
    threshold = fit_positive_threshold(scores.labels, scores.feature)
    info = {
        "validation_auc": {k: round(v, 4) for k, v in scores.aucs().items()},
        "validation_positive_fraction": round(float(scores.labels.mean()), 3),
        "decision_weights": {"ct": weights[0], "pt": weights[1]},
        "threshold": threshold,
        "final_loss": round(float(np.mean(losses[-100:])), 4),
        "data_seconds": round(data_s, 1),
        "train_seconds": round(train_s, 1),
        "train_slices": len(y),
        "train_positive_slices": int(y.sum()),
    }
    return model, info


def manifest_data(scale: recipe.FusionScale, sha256: str, info: dict[str, Any]) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "manifest_version": 1,
        "name": recipe.NAME,
        "version": recipe.VERSION,
        "task": "fusion",
        "description": (
            "CT+PT fusion: CT and the PT co-registered onto it, one CNN branch per modality; "
            "the study's probability of an FDG-avid lesion is the maximum over its slices of "
            f"the fused head. {DESCRIPTION}"
        ),
        "input": {
            "preprocess": recipe.ct_spec(scale).model_dump(mode="json", exclude_defaults=True),
            "shape": [scale.size, scale.size],
            "channels": 2,
            "batch_size": 16,
        },
        "outputs": [{"name": "avid_lesion", "concept": recipe.AVID_LESION}],
        "thresholds": {"positive": info["threshold"]},
        "fusion": {
            "inputs": {"ct": {"modality": ["CT"]}, "pt": {"modality": ["PT"]}},
            "reference": "ct",
            "preprocess": {"pt": recipe.pt_spec().model_dump(mode="json", exclude_defaults=True)},
            "decision_weights": info["decision_weights"],
            "method": "feature",
        },
        "architecture": {"name": "fusion_classifier", "params": recipe.params(scale)},
        "weights": {"file": f"{recipe.NAME}.weights.h5", "sha256": sha256},
    }
    ModelManifest.model_validate(manifest)
    return manifest


def train_fusion_model(
    out_dir: str | Path,
    *,
    steps: int | None = None,
    seed: int = 0,
    scale: recipe.FusionScale = recipe.FULL,
    progress: bool = True,
) -> Written:
    """Train and install ``out_dir/ct-pt-avid-fusion``: weights (from a fresh
    uncompiled model), manifest.yaml with their SHA-256, training.json."""
    from pacsnode.lab.evaluation import _jsonable
    from pacsnode.lab.training import save_weights

    started = time.monotonic()
    n_steps = steps or scale.steps
    model, info = train(scale, seed, n_steps, progress)
    folder = Path(out_dir) / recipe.NAME
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{recipe.NAME}.weights.h5"
    sha256 = save_weights(model, weights)
    manifest = manifest_data(scale, sha256, info)
    header = (
        f"# {recipe.NAME} {recipe.VERSION}: written by `pacsnode train {recipe.NAME}` "
        f"(seed {seed}, {n_steps} steps).\n"
        "# Trained on synthetic phantoms (models/fusion_recipe.py); for demonstration, not "
        "clinical use.\n"
    )
    manifest_path = folder / "manifest.yaml"
    _write_text(
        manifest_path, header + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=100)
    )
    read_manifest(manifest_path)
    seconds = time.monotonic() - started
    record = {
        "model": recipe.NAME,
        "version": recipe.VERSION,
        "seed": seed,
        "steps": n_steps,
        "scale": "full" if scale == recipe.FULL else "custom",
        "seconds": round(seconds, 1),
        "weights_sha256": sha256,
        "data_seeds": {
            "training": f"from {recipe.FUSION_TRAIN_SEED}",
            "validation": f"from {recipe.FUSION_VALIDATION_SEED}",
            "held_out": f"from {recipe.FUSION_HELD_OUT_SEED} (pacsnode evaluate)",
        },
        **info,
    }
    _write_text(folder / "training.json", json.dumps(_jsonable(record), indent=2) + "\n")
    for path in (weights, manifest_path, folder / "training.json"):
        path.chmod(0o644)
    return Written(folder, manifest_path, weights, sha256, seconds, weights.stat().st_size)
