"""Train a tiny Keras lesion segmenter and install it as a pacsnode model.

The worked example of docs/plug-in-your-model.md. It stands for "your
trained model": a few convolutions trained for a minute on pacsnode's
synthetic phantoms, for demonstration only, not for clinical use. The
steps are those for any Keras model:

1. prepare training inputs exactly as the node will (the manifest's
   preprocess spec, through pacsnode's own preprocessing code);
2. train, then save the whole model as one ``.keras`` file;
3. compute the file's SHA-256 and write ``manifest.yaml`` beside it.

Usage: python docs/examples/tiny_segmenter.py MODELS_DIR [--steps N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import yaml

from pacsnode.lab.phantom import StudySpec, generate_study
from pacsnode.lab.recipe_data import mask_on, volume_of
from pacsnode.models.inputspec import PreprocessSpec
from pacsnode.workers.preprocess import preprocess

NAME = "tiny-lesion-segmenter"
VERSION = "0.1.0"
# The node applies exactly this to every series the model runs on.
SPEC = PreprocessSpec(target_spacing=(4.0, 1.5, 1.5), normalise="window", window=(40.0, 400.0))


def training_data(studies: int, seed: int, crop: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(n, crop, crop, 1) inputs and lesion masks from phantom CT studies,
    prepared as the node prepares a series; crops keep training fast, half of
    them centred on lesion voxels, half anywhere."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k in range(studies):
        study = generate_study(
            StudySpec(seed=seed + k, modalities=("CT",), slices=60, size=256, lesions=3)
        )
        ct = study.series["CT"]
        x = preprocess(volume_of(ct), SPEC)
        y = mask_on(ct, study.lesion_mask > 0, SPEC)
        x = np.pad(x, ((0, 0), (crop, crop), (crop, crop)))
        y = np.pad(y, ((0, 0), (crop, crop), (crop, crop)))
        lesion = np.argwhere(y)
        for i in range(64):
            if i % 2 == 0 and len(lesion):
                z, cy, cx = lesion[rng.integers(len(lesion))]
            else:
                z = rng.integers(x.shape[0])
                cy, cx = rng.integers(crop, x.shape[1] - crop, size=2)
            y0, x0 = cy - crop // 2, cx - crop // 2
            xs.append(x[z, y0 : y0 + crop, x0 : x0 + crop])
            ys.append(y[z, y0 : y0 + crop, x0 : x0 + crop])
    return np.stack(xs)[..., None], np.stack(ys)[..., None].astype("float32")


def build_model() -> object:
    import keras

    inputs = keras.Input(shape=(None, None, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", dilation_rate=2)(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", dilation_rate=4)(h)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(h)  # one channel per output
    return keras.Model(inputs, outputs, name=NAME.replace("-", "_"))


def manifest(weights_file: str, sha256: str) -> dict[str, object]:
    lesion = {"value": "52988006", "scheme_designator": "SCT", "meaning": "Lesion"}
    return {
        "manifest_version": 1,
        "name": NAME,
        "version": VERSION,
        "task": "segmentation",
        "description": "Tiny example segmenter from docs/plug-in-your-model.md, trained on "
        "synthetic phantoms; for demonstration, not clinical use.",
        "applies_to": {"modality": ["CT"], "slices": {"min": 8}},
        "input": {
            "preprocess": SPEC.model_dump(mode="json", exclude_defaults=True),
            "shape": [256, 256],
            "channels": 1,
            "batch_size": 8,
        },
        "outputs": [
            {
                "name": "lesion",
                "concept": lesion,
                "segment": {
                    "category": {
                        "value": "49755003",
                        "scheme_designator": "SCT",
                        "meaning": "Morphologically Altered Structure",
                    },
                    "type": dict(lesion),
                },
            }
        ],
        "thresholds": {"mask": 0.5},
        "weights": {"file": weights_file, "sha256": sha256},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()

    import keras

    keras.utils.set_random_seed(0)
    x, y = training_data(studies=4, seed=5000)
    print(f"training on {len(x)} slices of {x.shape[1]}x{x.shape[2]}")
    model = build_model()
    bce, dice = keras.losses.BinaryCrossentropy(), keras.losses.Dice()
    # Lesion voxels are rare: cross-entropy alone learns "no lesion anywhere".
    model.compile(  # type: ignore[attr-defined]
        optimizer=keras.optimizers.Adam(1e-2), loss=lambda t, p: bce(t, p) + dice(t, p)
    )
    batches = max(1, len(x) // 32)
    model.fit(x, y, batch_size=32, epochs=max(1, args.steps // batches), verbose=2)  # type: ignore[attr-defined]
    # Save a fresh, uncompiled copy: no optimizer state, no training-only loss.
    trained = model
    model = build_model()
    model.set_weights(trained.get_weights())  # type: ignore[attr-defined]

    folder = args.models_dir / NAME
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{NAME}.keras"
    model.save(weights)  # type: ignore[attr-defined]
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    text = yaml.safe_dump(manifest(weights.name, sha256), sort_keys=False)
    (folder / "manifest.yaml").write_text(
        "# Written by docs/examples/tiny_segmenter.py: for demonstration, not clinical use.\n"
        + text
    )
    print(f"wrote {weights} (sha256 {sha256}) and {folder / 'manifest.yaml'}")


if __name__ == "__main__":
    main()
