"""Load models once per worker process and run batched inference.

Only workers import this module (it imports TensorFlow, about 2-3 s and
500 MB). :func:`load_model` keeps one :class:`LoadedModel` per weights file
and SHA-256 in a process-wide cache, so every job of a worker process reuses
the same model and its traced inference function.

Inference runs a ``tf.function`` over batches of a few slices (8 by default):
on our 2-core CPU this was the fastest way, ahead of ``model.predict``, and
an eager call on a whole 200x512x512 volume needed 5.4 GB. A GPU is used when
TensorFlow finds one, with the ``mixed_float16`` policy for models built
here; on a CPU float32 stays (float16 was slower there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pacsnode.core.errors import ModelInputError, ModelLoadError
from pacsnode.models import architectures
from pacsnode.models.tf_env import gpus, keras, tf

DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class DeviceInfo:
    device: str  # "GPU" or "CPU"
    gpus: tuple[str, ...]
    mixed_precision: bool


def device_info() -> DeviceInfo:
    """Where inference runs: the first GPU if any (mixed precision), else the CPU."""
    found = tuple(gpus())
    return DeviceInfo(device="GPU" if found else "CPU", gpus=found, mixed_precision=bool(found))


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build models under a Keras dtype policy (``float32``, ``mixed_float16``)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LoadedModel:
    """A Keras model with a traced, batched inference function.

    ``spatial_multiple``: slice height and width must be a multiple of it
    (a U-Net's ``2**depth``); :func:`segment_volume` and
    :func:`reconstruction_error` pad to it and crop back.
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        name: str | None = None,
        sha256: str | None = None,
        spatial_multiple: int = 1,
    ) -> None:
        self.model = model
        self.name = name or str(model.name)
        self.sha256 = sha256
        self.spatial_multiple = spatial_multiple
        self.input_shape: tuple[int | None, ...] = (None, *tuple(model.inputs[0].shape)[1:])
        self.output_shape: tuple[int | None, ...] = tuple(model.outputs[0].shape)[1:]
        self._infer = tf.function(
            self._call,
            input_signature=[tf.TensorSpec(self.input_shape, tf.float32)],
        )

    def _call(self, x: Any) -> Any:
        return self.model(x, training=False)

    def check_input(self, x: np.ndarray) -> None:
        expected = self.input_shape
        ok = x.ndim == len(expected) and all(
            e is None or e == a for e, a in zip(expected[1:], x.shape[1:], strict=True)
        )
        if not ok:
            shown = tuple("any" if e is None else e for e in expected[1:])
            raise ModelInputError(
                f"model {self.name}: input of shape {x.shape[1:]} per item, expected {shown}"
            )

    def predict(self, x: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Run the model in inference mode over axis 0 in batches; float32 numpy out."""
        x = np.asarray(x, dtype=np.float32)
        self.check_input(x)
        outputs = [
            self._infer(tf.constant(x[start : start + batch_size])).numpy()
            for start in range(0, x.shape[0], batch_size)
        ]
        if not outputs:  # no slices: an empty result of the right shape
            shape = [
                d if d is not None else x.shape[i + 1] for i, d in enumerate(self.output_shape)
            ]
            return np.zeros((0, *shape), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32, copy=False)


_cache: dict[tuple[str, str, str, str], LoadedModel] = {}
_cache_lock = threading.Lock()


def load_model(
    path: str | Path,
    *,
    architecture: str | None = None,
    params: Mapping[str, Any] | None = None,
    sha256: str | None = None,
    spatial_multiple: int | None = None,
) -> LoadedModel:
    """Load a model once per process.

    ``path`` is either a ``.weights.h5`` file for one of
    :data:`models.architectures.ARCHITECTURES` (built with ``params``) or a
    complete ``.keras`` model file (``architecture`` then unused). With
    ``sha256`` (from the manifest) the file must match it; the cache is keyed
    by the resolved path and the hash, so a replaced file loads afresh.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    key_hash = sha256 or file_sha256(path)
    key = (str(path), key_hash, architecture or "", json.dumps(params or {}, sort_keys=True))
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        if sha256 is not None and (actual := file_sha256(path)) != sha256:
            raise ModelLoadError(f"model file {path}: SHA-256 {actual}, manifest says {sha256}")
        loaded = _load_uncached(path, architecture, params, key_hash, spatial_multiple)
        _cache[key] = loaded
        return loaded


def _load_uncached(
    path: Path,
    architecture: str | None,
    params: Mapping[str, Any] | None,
    sha256: str,
    spatial_multiple: int | None,
) -> LoadedModel:
    try:
        if path.name.endswith(".keras"):
            model = keras.models.load_model(path, compile=False)
            multiple = spatial_multiple or 1
        elif architecture is None:
            raise ModelLoadError(f"model file {path}: weights file without an architecture")
        else:
            policy = "mixed_float16" if device_info().mixed_precision else "float32"
            with dtype_policy(policy):
                model = architectures.build(architecture, params)
            _load_weights_strictly(model, path)
            multiple = spatial_multiple or architectures.spatial_multiple(architecture, params)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"model file {path}: cannot load ({exc})") from exc
    return LoadedModel(model, name=path.name, sha256=sha256, spatial_multiple=multiple)


def _load_weights_strictly(model: keras.Model, path: Path) -> None:
    """Load weights; refuse a file that fits the model only in part.

    Keras skips layers it cannot match with nothing but a warning, which
    would leave them with random weights: here any warning is an error.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path)
    if caught:
        raise ModelLoadError(
            f"model file {path}: does not fit the architecture ({caught[0].message})"
        )


def clear_model_cache() -> None:
    """Forget every loaded model (tests; a worker never needs it)."""
    with _cache_lock:
        _cache.clear()


def _as_slices(x: np.ndarray, what: str) -> np.ndarray:
    """``(N, H, W)`` or ``(N, H, W, 1)`` → float32 ``(N, H, W, 1)``."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ModelInputError(f"{what}: expected (N, H, W) slices, got shape {x.shape}")
    return x


def _pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    """Pad height and width at the far end with the minimum (the background)."""
    pad_h = -x.shape[1] % multiple
    pad_w = -x.shape[2] % multiple
    if not (pad_h or pad_w):
        return x
    fill = float(x.min()) if x.size else 0.0
    return np.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=fill)


def classify_slices(
    model: LoadedModel, slices: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
    """Lesion probability per slice (or patch): ``(N, H, W)`` → ``(N,)``."""
    x = _as_slices(slices, model.name)
    probabilities = model.predict(
        _pad_to_multiple(x, model.spatial_multiple), batch_size=batch_size
    )
    return probabilities.reshape(x.shape[0], -1)[:, 0] if len(x) else np.zeros(0, np.float32)


def segment_volume(
    model: LoadedModel, volume: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
    """Run a 2D segmenter slice by slice: ``(Z, H, W)`` → ``(Z, H, W)`` probabilities."""
    x = _as_slices(volume, model.name)
    height, width = x.shape[1:3]
    probabilities = model.predict(
        _pad_to_multiple(x, model.spatial_multiple), batch_size=batch_size
    )
    return probabilities[:, :height, :width, 0]


def classify_sequences(
    model: LoadedModel, volumes: Sequence[np.ndarray], *, batch_size: int = 4
) -> np.ndarray:
    """Study probability per volume for a sequence classifier; volumes are
    ``(T_i, S, S)`` and may differ in slice count."""
    if not volumes:
        return np.zeros(0, dtype=np.float32)
    out = []
    for start in range(0, len(volumes), batch_size):
        batch = architectures.pad_volumes(volumes[start : start + batch_size])
        out.append(model.predict(batch, batch_size=batch.shape[0]).reshape(-1))
    return np.concatenate(out)


def classify_sequence(model: LoadedModel, volume: np.ndarray) -> float:
    """Study probability of one ``(T, S, S)`` volume."""
    return float(classify_sequences(model, [volume])[0])


def reconstruct(
    model: LoadedModel, volume: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
    """An autoencoder's reconstruction of ``(Z, H, W)``, same shape."""
    return segment_volume(model, volume, batch_size=batch_size)


def slice_reconstruction_errors(
    model: LoadedModel, volume: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
    """The autoencoder's mean squared error per slice, ``(Z,)``."""
    x = _as_slices(volume, model.name)[..., 0]
    return architectures.slice_reconstruction_errors(
        x, reconstruct(model, x, batch_size=batch_size)
    )


def reconstruction_error(
    model: LoadedModel, volume: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> float:
    """The gate's score of one volume (compare with the manifest's threshold)."""
    return float(np.mean(slice_reconstruction_errors(model, volume, batch_size=batch_size)))
