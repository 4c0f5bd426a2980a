"""Seeded training of pacsnode's bundled models.

One function per model kind (:func:`train_slice_classifier`,
:func:`train_sequence_classifier`, :func:`train_unet`,
:func:`train_autoencoder`) takes either arrays ``(x, y)`` or a
:data:`BatchSampler` (a callable drawing one batch from a numpy generator,
e.g. slices of freshly generated phantoms) and returns a :class:`TrainResult`.

What every run shares, and why:

- a seed fixes the weight initialisation, the data order, the validation
  split and the augmentation (``keras.utils.set_random_seed`` and a
  ``tf.random.Generator``), so ``pacsnode train`` is reproducible up to
  floating-point rounding in multi-threaded kernels;
- augmentation runs on the fly as TensorFlow ops inside the training step:
  random flips, rotation, zoom and shift as one affine resampling (the same
  transform for an image and its mask, and for all slices of a volume), then
  Gaussian noise on the image only;
- AdamW with a cosine learning-rate decay: the small final steps let
  BatchNorm's moving statistics (momentum 0.9) settle on the final weights,
  which is what makes short runs good in inference mode;
- early stopping on the validation loss, computed in inference mode, keeping
  the best weights;
- training always runs in float32 (mixed precision is for inference on GPUs).

:func:`save_weights` writes the weights of a fresh uncompiled copy of the
model (Keras would otherwise add the optimizer state, about twice the
weights) and returns their SHA-256 for the manifest.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pacsnode.core.layout import atomic_path
from pacsnode.lab import evaluation
from pacsnode.models import architectures
from pacsnode.models.runtime import dtype_policy, file_sha256
from pacsnode.models.tf_env import keras, tf

# Draws one batch (x, y) of the given size from the generator.
BatchSampler = Callable[[np.random.Generator, int], tuple[Any, Any]]
Data = tuple[Any, Any] | BatchSampler
AugmentMode = Literal["image", "image_and_mask", "sequence", "autoencoder"]


@dataclass(frozen=True)
class Augmentation:
    """Random transforms applied to each training batch (not to validation).

    Rotation in degrees (±), zoom as a relative scale (1 ± max_zoom), shift as a
    fraction of the image size (±), noise as the largest standard deviation of
    additive Gaussian noise (each image draws its own in [0, noise_std]).
    Borders are filled by reflection.
    """

    flip_left_right: bool = True
    flip_up_down: bool = True
    max_rotation_degrees: float = 15.0
    max_zoom: float = 0.1
    max_shift: float = 0.1
    noise_std: float = 0.02


NO_AUGMENTATION = Augmentation(False, False, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    steps_per_epoch: int = 50
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    final_learning_rate_fraction: float = 0.01
    warmup_steps: int = 0
    validation_fraction: float = 0.15
    validation_batches: int = 8  # drawn once from a sampler with its own seed
    patience: int = 5
    seed: int = 0
    augmentation: Augmentation = field(default_factory=Augmentation)
    progress: bool = True
    description: str = "training"


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int
    stopped_early: bool
    seconds: float


# --- losses ----------------------------------------------------------------


def binary_crossentropy(y: Any, p: Any) -> Any:
    return tf.reduce_mean(keras.losses.binary_crossentropy(y, p))


def soft_dice_loss(y: Any, p: Any, smooth: float = 1.0) -> Any:
    """1 - soft Dice over the whole batch (stable when some slices are empty)."""
    intersection = tf.reduce_sum(y * p)
    return 1.0 - (2.0 * intersection + smooth) / (tf.reduce_sum(y) + tf.reduce_sum(p) + smooth)


def segmentation_loss(y: Any, p: Any) -> Any:
    """Cross-entropy for every pixel plus soft Dice for the small lesions."""
    return binary_crossentropy(y, p) + soft_dice_loss(y, p)


def mean_squared_error(y: Any, p: Any) -> Any:
    return tf.reduce_mean(tf.square(y - p))


# --- augmentation ----------------------------------------------------------


class Augmenter:
    """Seeded random augmentation of a batch, as TensorFlow ops.

    ``mode``: ``image`` (classifier slices), ``image_and_mask`` (U-Net: the
    mask follows the geometry, is re-binarised, gets no noise), ``sequence``
    (``(B, T, H, W, 1)``: one transform per volume, padding slices stay zero),
    ``autoencoder`` (the target is the geometrically augmented image without
    the noise, so the network learns to reconstruct clean anatomy).
    """

    def __init__(self, config: Augmentation, mode: AugmentMode, seed: int) -> None:
        self.config = config
        self.mode = mode
        self.rng = tf.random.Generator.from_seed(seed)

    def _transforms(self, n: Any, height: Any, width: Any) -> Any:
        """Per-image projective transforms mapping output to input coordinates."""
        c = self.config
        ones = tf.ones([n])

        def flip(enabled: bool) -> Any:
            if not enabled:
                return ones
            return tf.where(self.rng.uniform([n]) < 0.5, -ones, ones)

        fx, fy = flip(c.flip_left_right), flip(c.flip_up_down)
        angle = self.rng.uniform([n], -1.0, 1.0) * (c.max_rotation_degrees * math.pi / 180.0)
        scale = 1.0 + self.rng.uniform([n], -1.0, 1.0) * c.max_zoom
        tx = self.rng.uniform([n], -1.0, 1.0) * c.max_shift * width
        ty = self.rng.uniform([n], -1.0, 1.0) * c.max_shift * height
        # Forward: flip, scale, rotate about the centre, shift. The op wants the
        # inverse, input = M (output - centre - shift) + centre, with
        # M = diag(fx, fy) / scale · R(-angle).
        cos, sin = tf.cos(angle), tf.sin(angle)
        m00, m01 = fx * cos / scale, fx * sin / scale
        m10, m11 = -fy * sin / scale, fy * cos / scale
        cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        ox, oy = cx + tx, cy + ty
        zeros = tf.zeros([n])
        return tf.stack(
            [m00, m01, cx - m00 * ox - m01 * oy, m10, m11, cy - m10 * ox - m11 * oy, zeros, zeros],
            axis=1,
        )

    def _resample(self, images: Any, transforms: Any) -> Any:
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=transforms,
            output_shape=tf.shape(images)[1:3],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="REFLECT",
        )

    def _noise(self, x: Any) -> Any:
        n = tf.shape(x)[0]
        std = self.rng.uniform([n, 1, 1, 1]) * self.config.noise_std
        return x + self.rng.normal(tf.shape(x)) * std

    def __call__(self, x: Any, y: Any) -> tuple[Any, Any]:
        shape = tf.shape(x)
        if self.mode == "sequence":
            batch, length = shape[0], shape[1]
            flat = tf.reshape(x, tf.concat([[-1], shape[2:]], axis=0))
            height, width = tf.cast(shape[2], tf.float32), tf.cast(shape[3], tf.float32)
            transforms = tf.repeat(self._transforms(batch, height, width), length, axis=0)
            flat = self._resample(flat, transforms)
            real = tf.cast(tf.reduce_max(tf.abs(flat), axis=[1, 2, 3], keepdims=True) > 0, x.dtype)
            flat = flat + (self._noise(flat) - flat) * real
            return tf.reshape(flat, shape), y
        height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        transforms = self._transforms(shape[0], height, width)
        if self.mode == "image_and_mask":
            both = self._resample(tf.concat([x, tf.cast(y, x.dtype)], axis=-1), transforms)
            return self._noise(both[..., :1]), tf.cast(both[..., 1:] > 0.5, y.dtype)
        x = self._resample(x, transforms)
        if self.mode == "autoencoder":
            return self._noise(x), x
        return self._noise(x), y


# --- data ------------------------------------------------------------------


def _take(x: Any, index: np.ndarray) -> Any:
    if isinstance(x, np.ndarray):
        return x[index]
    return [x[i] for i in index]


def _length(x: Any) -> int:
    return int(x.shape[0]) if isinstance(x, np.ndarray) else len(x)


class _Source:
    """Training batches and the fixed validation set, in a seeded order."""

    def __init__(self, data: Data, validation: tuple[Any, Any] | None, config: TrainConfig):
        self.config = config
        if callable(data):
            self._sampler: BatchSampler | None = data
            self._rng = np.random.default_rng([config.seed, 1])
            if validation is None:
                vrng = np.random.default_rng([config.seed, 2])
                parts = [data(vrng, config.batch_size) for _ in range(config.validation_batches)]
                validation = (_concat([p[0] for p in parts]), _concat([p[1] for p in parts]))
            self.validation = validation
            return
        self._sampler = None
        x, y = data
        n = _length(x)
        if validation is None:
            order = np.random.default_rng([config.seed, 2]).permutation(n)
            n_val = max(1, round(n * config.validation_fraction))
            validation = (_take(x, order[:n_val]), _take(y, order[:n_val]))
            x, y = _take(x, order[n_val:]), _take(y, order[n_val:])
        self.validation = validation
        self._x, self._y = x, y
        self._order = self._indices(_length(x))

    def _indices(self, n: int) -> Iterator[int]:
        rng = np.random.default_rng([self.config.seed, 1])
        while True:
            yield from rng.permutation(n).tolist()

    def batch(self) -> tuple[Any, Any]:
        size = self.config.batch_size
        if self._sampler is not None:
            return self._sampler(self._rng, size)
        index = np.array([next(self._order) for _ in range(size)])
        return _take(self._x, index), _take(self._y, index)


def _concat(parts: Sequence[Any]) -> Any:
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    return [item for p in parts for item in p]


def _as_images(x: Any) -> np.ndarray:
    """``(N, H, W)`` or ``(N, H, W, 1)`` → float32 ``(N, H, W, 1)``."""
    x = np.asarray(x, dtype=np.float32)
    return x[..., np.newaxis] if x.ndim == 3 else x


def _as_volumes(x: Any) -> np.ndarray:
    """``(B, T, S, S)`` array or a list of ``(T_i, S, S)`` → padded ``(B, T, S, S, 1)``."""
    if isinstance(x, np.ndarray) and x.ndim == 5:
        return x.astype(np.float32, copy=False)
    return architectures.pad_volumes(list(x))


def _as_labels(y: Any) -> np.ndarray:
    return np.asarray(y, dtype=np.float32).reshape(-1, 1)


@dataclass(frozen=True)
class _Kind:
    architecture: str
    loss: Callable[[Any, Any], Any]
    mode: AugmentMode
    prepare_x: Callable[[Any], np.ndarray]
    prepare_y: Callable[[Any, np.ndarray], np.ndarray]  # (y, prepared x)
    metric_name: str | None
    metric: Callable[[np.ndarray, np.ndarray], float] | None  # (y, prediction)


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return evaluation.roc_auc(y, p)


def _dice(y: np.ndarray, p: np.ndarray) -> float:
    return evaluation.dice(p >= 0.5, y >= 0.5)


_SLICE_CLASSIFIER = _Kind(
    architecture="slice_classifier",
    loss=binary_crossentropy,
    mode="image",
    prepare_x=_as_images,
    prepare_y=lambda y, x: _as_labels(y),
    metric_name="auc",
    metric=_auc,
)
_SEQUENCE_CLASSIFIER = _Kind(
    architecture="sequence_classifier",
    loss=binary_crossentropy,
    mode="sequence",
    prepare_x=_as_volumes,
    prepare_y=lambda y, x: _as_labels(y),
    metric_name="auc",
    metric=_auc,
)
_UNET = _Kind(
    architecture="unet",
    loss=segmentation_loss,
    mode="image_and_mask",
    prepare_x=_as_images,
    prepare_y=lambda y, x: _as_images(y),
    metric_name="dice",
    metric=_dice,
)
_AUTOENCODER = _Kind(
    architecture="autoencoder",
    loss=mean_squared_error,
    mode="autoencoder",
    prepare_x=_as_images,
    prepare_y=lambda y, x: x,
    metric_name=None,
    metric=None,
)


# --- the training loop -----------------------------------------------------


def _progress(config: TrainConfig) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not config.progress,
    )


def _predict_batches(infer: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [infer(tf.constant(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    )


def _validate(
    kind: _Kind, infer: Any, x: np.ndarray, y: np.ndarray, batch_size: int
) -> dict[str, float]:
    prediction = _predict_batches(infer, x, batch_size)
    result = {"val_loss": float(kind.loss(tf.constant(y), tf.constant(prediction)))}
    if kind.metric is not None and kind.metric_name is not None:
        result[f"val_{kind.metric_name}"] = kind.metric(y, prediction)
    return result


def _weights(model: keras.Model) -> list[np.ndarray]:
    """A copy of all weights, BatchNorm statistics included (``get_weights``
    goes through a numpy conversion that warns under numpy 2)."""
    return [np.array(v.numpy(), copy=True) for v in model.weights]


def _fit(
    kind: _Kind,
    data: Data,
    validation: tuple[Any, Any] | None,
    config: TrainConfig,
    params: dict[str, Any] | None,
    model: keras.Model | None,
) -> TrainResult:
    start = time.monotonic()
    keras.utils.set_random_seed(config.seed)
    if model is None:
        with dtype_policy("float32"):
            model = architectures.build(kind.architecture, params)
    source = _Source(data, validation, config)
    val_x = kind.prepare_x(source.validation[0])
    val_y = kind.prepare_y(source.validation[1], val_x)

    total_steps = config.epochs * config.steps_per_epoch
    warmup = min(config.warmup_steps, total_steps - 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate if not warmup else config.learning_rate / 10,
        decay_steps=max(1, total_steps - warmup),
        alpha=config.final_learning_rate_fraction,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    optimizer.build(model.trainable_variables)
    augment = Augmenter(config.augmentation, kind.mode, config.seed)

    # One trace for every batch shape the model accepts (slice counts vary).
    x_spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)
    y_spec = x_spec if kind.mode in ("image_and_mask", "autoencoder") else tf.TensorSpec((None, 1))

    @tf.function(input_signature=[x_spec, y_spec])
    def train_step(x: Any, y: Any) -> Any:
        x, y = augment(x, y)
        with tf.GradientTape() as tape:
            loss = kind.loss(y, model(x, training=True))
            if model.losses:
                loss += tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function(input_signature=[x_spec])
    def infer(x: Any) -> Any:
        return model(x, training=False)

    history: dict[str, list[float]] = {"loss": [], "learning_rate": []}
    best_loss, best_epoch, best_weights = math.inf, -1, _weights(model)
    stopped_early = False
    with _progress(config) as progress:
        epochs = progress.add_task(config.description, total=config.epochs, status="")
        steps = progress.add_task("  steps", total=config.steps_per_epoch, status="")
        for epoch in range(config.epochs):
            progress.reset(steps, total=config.steps_per_epoch, status="")
            losses = []
            for _ in range(config.steps_per_epoch):
                bx, by = source.batch()
                x = kind.prepare_x(bx)
                loss = float(train_step(tf.constant(x), tf.constant(kind.prepare_y(by, x))))
                losses.append(loss)
                progress.update(steps, advance=1, status=f"loss {np.mean(losses):.4f}")
            scores = _validate(kind, infer, val_x, val_y, config.batch_size)
            history["loss"].append(float(np.mean(losses)))
            history["learning_rate"].append(float(schedule(optimizer.iterations)))
            for name, value in scores.items():
                history.setdefault(name, []).append(value)
            summary = " ".join(f"{k} {v:.4f}" for k, v in scores.items())
            progress.update(epochs, advance=1, status=summary)
            progress.console.print(
                f"epoch {epoch + 1}/{config.epochs} loss {history['loss'][-1]:.4f} {summary}",
                highlight=False,
            )
            if scores["val_loss"] < best_loss:
                best_loss, best_epoch, best_weights = scores["val_loss"], epoch, _weights(model)
            elif epoch - best_epoch >= config.patience:
                stopped_early = True
                break
    model.set_weights(best_weights)
    return TrainResult(model, history, best_epoch, stopped_early, time.monotonic() - start)


def train_slice_classifier(
    data: Data,
    *,
    validation: tuple[Any, Any] | None = None,
    config: TrainConfig | None = None,
    params: dict[str, Any] | None = None,
    model: keras.Model | None = None,
) -> TrainResult:
    """Train the 2D lesion classifier on slices ``(N, H, W)`` with labels ``(N,)``."""
    return _fit(_SLICE_CLASSIFIER, data, validation, config or TrainConfig(), params, model)


def train_sequence_classifier(
    data: Data,
    *,
    validation: tuple[Any, Any] | None = None,
    config: TrainConfig | None = None,
    params: dict[str, Any] | None = None,
    model: keras.Model | None = None,
) -> TrainResult:
    """Train the study classifier on volumes (a list of ``(T_i, S, S)`` or an
    array ``(N, T, S, S)``) with study labels ``(N,)``."""
    return _fit(_SEQUENCE_CLASSIFIER, data, validation, config or TrainConfig(), params, model)


def train_unet(
    data: Data,
    *,
    validation: tuple[Any, Any] | None = None,
    config: TrainConfig | None = None,
    params: dict[str, Any] | None = None,
    model: keras.Model | None = None,
) -> TrainResult:
    """Train the U-Net on slices ``(N, H, W)`` with binary masks ``(N, H, W)``.

    H and W must be multiples of ``2**depth``. Slices without lesion teach the
    network to stay quiet; keep a share of them (a sampler can balance).
    """
    return _fit(_UNET, data, validation, config or TrainConfig(), params, model)


def train_autoencoder(
    data: np.ndarray | BatchSampler,
    *,
    validation: np.ndarray | None = None,
    config: TrainConfig | None = None,
    params: dict[str, Any] | None = None,
    model: keras.Model | None = None,
) -> TrainResult:
    """Train the gate's autoencoder on normal slices ``(N, H, W)`` only.

    A sampler's ``y`` is ignored: the target is always the input.
    """
    train: Data = data if callable(data) else (data, data)
    val = None if validation is None else (validation, validation)
    return _fit(_AUTOENCODER, train, val, config or TrainConfig(), params, model)


def fit_gate_threshold(
    normal_errors: np.ndarray, *, quantile: float = 0.99, margin: float = 1.25
) -> float:
    """The gate's threshold from reconstruction errors of normal volumes.

    A high quantile of the normal errors times a margin: the margin allows
    for the held-out normal data being a little harder than the training data.
    """
    return float(np.quantile(np.asarray(normal_errors, dtype=np.float64), quantile) * margin)


def save_weights(model: keras.Model, path: str | Path) -> str:
    """Write the model's weights to ``path`` (``*.weights.h5``) atomically and
    return the file's SHA-256 (for the manifest).

    The weights go through a fresh uncompiled clone, so no optimizer state
    ends up in the file.
    """
    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ValueError(f"{path}: weights files must end in .weights.h5")
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = keras.models.clone_model(model)
    fresh.set_weights(_weights(model))
    with atomic_path(path, suffix=".weights.h5") as tmp, warnings.catch_warnings():
        # Keras 3.15 converts variables with np.array(), which TensorFlow's
        # __array__ answers with a numpy 2 deprecation notice; harmless.
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        fresh.save_weights(tmp)
    return file_sha256(path)
