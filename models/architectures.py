"""Keras definitions of pacsnode's bundled models (functional API, Keras 3).

Five small models, each built by one typed function:

- :func:`build_slice_classifier`: a 2D CNN that gives one lesion probability
  per slice (or per 2D patch); global average pooling, sigmoid output.
- :func:`build_sequence_classifier`: a study classifier; a per-slice CNN
  encoder, then a bidirectional GRU over the slices (any slice count).
- :func:`build_unet`: a 2D U-Net lesion segmenter, run slice by slice to give
  a 3D probability mask.
- :func:`build_autoencoder`: a convolutional autoencoder trained on normal
  inputs only; its reconstruction error (:func:`volume_reconstruction_error`)
  is the out-of-distribution gate.
- :func:`build_fusion_classifier`: CT and co-registered PT slices, one
  branch per modality, CT-only, PT-only and feature-level fused heads.

Conventions: inputs are preprocessed float32 slices with a trailing channel
axis, ``(H, W, 1)``; every layer is named so weights files stay readable;
BatchNormalization uses momentum 0.9, because with Keras's default of 0.99 the
moving statistics of a short training run are far from the batch statistics
and inference-mode results collapse (Dice 0.09 instead of 0.91 in our runs);
final activations are float32 so the models also run under a mixed-precision
policy on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pacsnode.models.tf_env import keras

layers = keras.layers
ops = keras.ops

BN_MOMENTUM = 0.9

# Padding value of the slice axis of a sequence batch: an all-zero slice is
# treated as padding and masked out of the recurrent layer.
SEQUENCE_PAD_VALUE = 0.0


def _conv_bn_relu(x: Any, filters: int, name: str, *, strides: int = 1) -> Any:
    x = layers.Conv2D(
        filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _conv_block(x: Any, filters: int, name: str) -> Any:
    x = _conv_bn_relu(x, filters, f"{name}a")
    return _conv_bn_relu(x, filters, f"{name}b")


def _feature_maps(
    x: Any, *, base_filters: int, depth: int, name: str
) -> Any:  # (B, H, W, 1) -> (B, H / 2**depth, W / 2**depth, F)
    for level in range(depth):
        x = _conv_block(x, base_filters * 2**level, f"{name}_block{level}")
        x = layers.MaxPooling2D(2, name=f"{name}_pool{level}")(x)
    return x


def _slice_features(
    x: Any, *, base_filters: int, depth: int, name: str
) -> Any:  # (B, H, W, 1) -> (B, F)
    x = _feature_maps(x, base_filters=base_filters, depth=depth, name=name)
    return layers.GlobalAveragePooling2D(name=f"{name}_gap")(x)


def build_slice_classifier(
    input_size: int | None = None,
    *,
    base_filters: int = 16,
    depth: int = 4,
    dropout: float = 0.2,
    pooling: str = "avg",
    name: str = "slice_classifier",
) -> keras.Model:
    """A 2D CNN lesion classifier: ``(B, H, W, 1)`` → ``(B, 1)`` probabilities.

    ``input_size`` fixes H = W; ``None`` accepts any size (global pooling
    makes the network size-agnostic), which also suits 2D patches.

    ``pooling="avg"`` averages the last feature maps and classifies the
    average. ``pooling="max"`` classifies every cell of the last feature map
    (a 1 x 1 convolution gives a map of logits) and keeps the largest: a
    slice is as positive as its most suspicious region, so a model trained
    on patches gives the same evidence for a lesion on a whole slice, however
    large the slice is.
    """
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', not {pooling!r}")
    inputs = keras.Input((input_size, input_size, 1), name="slices")
    if pooling == "max":
        x = _feature_maps(inputs, base_filters=base_filters, depth=depth, name="features")
        x = layers.SpatialDropout2D(dropout, name="dropout")(x)
        x = layers.Conv2D(1, 1, name="logit_map")(x)
        x = layers.GlobalMaxPooling2D(name="logit")(x)
    else:
        x = _slice_features(inputs, base_filters=base_filters, depth=depth, name="features")
        x = layers.Dropout(dropout, name="dropout")(x)
        x = layers.Dense(1, name="logit")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="pacsnode")
class SliceMask(keras.layers.Layer):
    """``(B, T, H, W, 1)`` → ``(B, T)`` boolean: True where a slice is not padding."""

    def call(self, x: Any) -> Any:
        return ops.greater(ops.max(ops.abs(x - SEQUENCE_PAD_VALUE), axis=(2, 3, 4)), 0.0)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape[:2])


@keras.saving.register_keras_serializable(package="pacsnode")
class FoldSlices(keras.layers.Layer):
    """``(B, T, H, W, C)`` → ``(B·T, H, W, C)``: all slices of a batch go
    through the slice encoder in one call.

    Used instead of ``TimeDistributed``, which in Keras 3.15 loops over a
    known slice count one step at a time and miscounts an unknown one.
    """

    def call(self, x: Any) -> Any:
        return ops.reshape(x, (-1, *x.shape[2:]))

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (None, *input_shape[2:])


@keras.saving.register_keras_serializable(package="pacsnode")
class UnfoldSlices(keras.layers.Layer):
    """``[(B·T, F), (B, T, ...)]`` → ``(B, T, F)``, the inverse of :class:`FoldSlices`."""

    def call(self, inputs: Sequence[Any]) -> Any:
        features, volume = inputs
        shape = ops.shape(volume)
        return ops.reshape(features, (shape[0], shape[1], features.shape[-1]))

    def compute_output_shape(
        self, input_shapes: Sequence[tuple[int | None, ...]]
    ) -> tuple[int | None, ...]:
        features, volume = input_shapes
        return (volume[0], volume[1], features[-1])


def build_sequence_classifier(
    slice_size: int = 64,
    *,
    base_filters: int = 16,
    depth: int = 4,
    features: int = 64,
    rnn_units: int = 32,
    dropout: float = 0.2,
    pooling: str = "avg",
    name: str = "sequence_classifier",
) -> keras.Model:
    """A study classifier: ``(B, T, S, S, 1)`` → ``(B, 1)``, T free.

    Every slice goes through the same CNN encoder; a bidirectional GRU reads
    the slice features in order, so a lesion seen on neighbouring slices
    weighs more than a single bright slice. Volumes of different slice counts
    share a batch when padded with all-zero slices (:func:`pad_volumes`);
    :class:`SliceMask` hides the padding from the GRU.

    ``pooling="max"`` matches a ``pooling="max"`` slice classifier: each
    slice's features are the maximum and the mean of its feature maps, plus
    the slice classifier's own logit (its ``logit_map`` layer), so the encoder
    and logit of a trained slice classifier can be copied in and frozen.
    """
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', not {pooling!r}")
    inputs = keras.Input((None, slice_size, slice_size, 1), name="volume")
    mask = SliceMask(name="slice_mask")(inputs)
    x = FoldSlices(name="fold_slices")(inputs)
    if pooling == "max":
        maps = _feature_maps(x, base_filters=base_filters, depth=depth, name="features")
        pooled = layers.Concatenate(name="features_pooled")(
            [
                layers.GlobalMaxPooling2D(name="features_gmp")(maps),
                layers.GlobalAveragePooling2D(name="features_gap")(maps),
            ]
        )
        dense = layers.Dense(features, activation="relu", name="features_dense")(pooled)
        logit = layers.GlobalMaxPooling2D(name="slice_logit")(
            layers.Conv2D(1, 1, name="logit_map")(maps)
        )
        x = layers.Concatenate(name="slice_features")([dense, logit])
    else:
        x = _slice_features(x, base_filters=base_filters, depth=depth, name="features")
        x = layers.Dense(features, activation="relu", name="features_dense")(x)
    x = UnfoldSlices(name="unfold_slices")([x, inputs])
    x = layers.Bidirectional(layers.GRU(rnn_units, name="gru"), name="bigru")(x, mask=mask)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(1, name="logit")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="pacsnode")
class FeatureMask(keras.layers.Layer):
    """``(B, T, F)`` → ``(B, T)`` boolean: True where a slice's features are not all zero."""

    def call(self, x: Any) -> Any:
        return ops.any(ops.not_equal(x, 0.0), axis=-1)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape[:2])


def build_sequence_head(
    pooled_features: int,
    *,
    features: int = 64,
    rnn_units: int = 32,
    dropout: float = 0.2,
    name: str = "sequence_head",
) -> keras.Model:
    """The trainable part of a ``pooling="max"`` sequence classifier, on
    features its frozen encoder computed once: ``(B, T, pooled_features + 1)``
    (each slice's pooled feature maps, then its slice logit; padding slices
    all zero) → ``(B, 1)``. Its layers carry the names of the full model's,
    so trained weights copy across by name (:func:`build_sequence_classifier`)."""
    inputs = keras.Input((None, pooled_features + 1), name="slice_features")
    mask = FeatureMask(name="slice_mask")(inputs)
    pooled = layers.Lambda(lambda t: t[..., :pooled_features], name="pooled")(inputs)
    logit = layers.Lambda(lambda t: t[..., pooled_features:], name="slice_logit")(inputs)
    dense = layers.Dense(features, activation="relu", name="features_dense")(pooled)
    x = layers.Concatenate(name="slice_features_concat")([dense, logit])
    x = layers.Bidirectional(layers.GRU(rnn_units, name="gru"), name="bigru")(x, mask=mask)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(1, name="logit")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name=name)


def build_unet(
    input_size: int | None = None,
    *,
    base_filters: int = 16,
    depth: int = 3,
    name: str = "unet",
) -> keras.Model:
    """A 2D U-Net: ``(B, H, W, 1)`` → ``(B, H, W, 1)`` lesion probabilities.

    H and W must be multiples of ``2**depth`` (the runtime pads volumes).
    """
    inputs = keras.Input((input_size, input_size, 1), name="slices")
    x = inputs
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2**level, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = _conv_block(x, base_filters * 2**depth, "bottom")
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"up{level}_transpose")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = _conv_block(x, filters, f"up{level}")
    x = layers.Conv2D(1, 1, name="logit")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name=name)


def build_autoencoder(
    input_size: int | None = None,
    *,
    base_filters: int = 16,
    depth: int = 3,
    latent_channels: int = 8,
    name: str = "autoencoder",
) -> keras.Model:
    """A convolutional autoencoder: ``(B, H, W, 1)`` → ``(B, H, W, 1)``.

    No skip connections: everything must pass the bottleneck of
    ``latent_channels`` at 1/``2**depth`` resolution, so only inputs like the
    training data are reconstructed well. The output is linear (inputs may be
    z-scored as well as windowed to [0, 1]). H and W must be multiples of
    ``2**depth``.
    """
    inputs = keras.Input((input_size, input_size, 1), name="slices")
    x = inputs
    for level in range(depth):
        x = _conv_bn_relu(x, base_filters * 2**level, f"enc{level}", strides=2)
    x = layers.Conv2D(latent_channels, 1, name="latent")(x)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(
            base_filters * 2**level, 3, strides=2, padding="same", name=f"dec{level}_transpose"
        )(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"dec{level}_bn")(x)
        x = layers.Activation("relu", name=f"dec{level}_relu")(x)
    x = layers.Conv2D(1, 3, padding="same", name="reconstruction_conv")(x)
    outputs = layers.Activation("linear", dtype="float32", name="reconstruction")(x)
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="pacsnode")
class TakeChannel(keras.layers.Layer):
    """Channel ``index`` of a ``(B, H, W, C)`` stack, kept as ``(B, H, W, 1)``."""

    def __init__(self, index: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index = index

    def call(self, x: Any) -> Any:
        return x[..., self.index : self.index + 1]

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*input_shape[:-1], 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "index": self.index}


FUSION_HEADS = ("ct", "pt", "fused")


def build_fusion_classifier(
    *, base_filters: int = 8, depth: int = 3, dropout: float = 0.2, name: str = "fusion_classifier"
) -> keras.Model:
    """A two-branch CT+PT slice classifier: ``(B, H, W, 2)`` → ``(B, 3)``.

    Channel 0 is the CT, channel 1 the PT co-registered onto it
    (workers.coregister). Each modality has its own convolutional branch and
    its own head (a 1 x 1 logit map, max over the slice): the ``ct`` and
    ``pt`` outputs see one modality only. The ``fused`` head classifies, cell
    by cell, the feature maps of a third branch that takes the channel stack
    concatenated with those of both modality branches, so it can ask whether
    the hot spot on PT lies on a lesion on CT (feature-level fusion).
    Outputs are probabilities in :data:`FUSION_HEADS` order.
    """
    inputs = keras.Input((None, None, 2), name="slices")
    maps = []
    logits = []
    for index, role in enumerate(FUSION_HEADS[:2]):
        x = TakeChannel(index, name=f"{role}_channel")(inputs)
        x = _feature_maps(x, base_filters=base_filters, depth=depth, name=f"{role}_features")
        maps.append(x)
        x = layers.SpatialDropout2D(dropout, name=f"{role}_dropout")(x)
        x = layers.Conv2D(1, 1, name=f"{role}_logit_map")(x)
        logits.append(layers.GlobalMaxPooling2D(name=f"{role}_logit")(x))
    # Early fusion: a third branch sees both channels from the first layer,
    # so it can ask whether the hot spot and the lesion are the same voxels.
    early = _feature_maps(inputs, base_filters=base_filters, depth=depth, name="fused_features")
    x = layers.Concatenate(name="fused_maps")([early, *maps])
    x = _conv_bn_relu(x, base_filters * 2 ** (depth - 1), "fused_mix")
    x = layers.SpatialDropout2D(dropout, name="fused_dropout")(x)
    x = layers.Conv2D(1, 1, name="fused_logit_map")(x)
    logits.append(layers.GlobalMaxPooling2D(name="fused_logit")(x))
    x = layers.Concatenate(name="logits")(logits)
    outputs = layers.Activation("sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name=name)


# Architecture names as a manifest may give them, with their builders.
ARCHITECTURES: Mapping[str, Callable[..., keras.Model]] = {
    "slice_classifier": build_slice_classifier,
    "sequence_classifier": build_sequence_classifier,
    "unet": build_unet,
    "autoencoder": build_autoencoder,
    "fusion_classifier": build_fusion_classifier,
}


def build(architecture: str, params: Mapping[str, Any] | None = None) -> keras.Model:
    """Build a named architecture with keyword parameters (e.g. from a manifest)."""
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {architecture!r} (known: {known})") from None
    return builder(**dict(params or {}))


def spatial_multiple(architecture: str, params: Mapping[str, Any] | None = None) -> int:
    """The number slice height and width must be a multiple of."""
    if architecture in ("unet", "autoencoder"):
        depth = int((params or {}).get("depth", 3))
        return int(2**depth)
    if architecture in ("slice_classifier", "fusion_classifier"):
        # Each pooling level halves the slice: smaller slices (a small field
        # of view) would pool to nothing.
        default = 4 if architecture == "slice_classifier" else 3
        return int(2 ** int((params or {}).get("depth", default)))
    return 1


def pad_volumes(volumes: Sequence[np.ndarray]) -> np.ndarray:
    """Stack ``(T_i, H, W)`` volumes into ``(B, max T, H, W, 1)``, padding with
    :data:`SEQUENCE_PAD_VALUE` slices at the end."""
    length = max(v.shape[0] for v in volumes)
    out = np.full(
        (len(volumes), length, *volumes[0].shape[1:3], 1), SEQUENCE_PAD_VALUE, dtype=np.float32
    )
    for i, v in enumerate(volumes):
        out[i, : v.shape[0]] = v.reshape(v.shape[0], v.shape[1], v.shape[2], 1)
    return out


def slice_reconstruction_errors(inputs: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Mean squared error per slice: ``(N, H, W[, 1])`` twice → ``(N,)``."""
    diff = np.asarray(inputs, np.float32) - np.asarray(reconstructions, np.float32)
    return np.mean(np.square(diff).reshape(diff.shape[0], -1), axis=1)


def volume_reconstruction_error(inputs: np.ndarray, reconstructions: np.ndarray) -> float:
    """The gate's score of one volume: the mean of its per-slice errors.

    A volume scores above the gate's threshold when it does not look like the
    training data (another modality, noise, a different body region).
    """
    return float(np.mean(slice_reconstruction_errors(inputs, reconstructions)))
