"""Turn a :class:`~workers.volume.Volume` into a model's input array.

One model's needs are a :class:`~pacsnode.models.inputspec.PreprocessSpec`
(from its manifest). :func:`preprocess` applies it in a fixed order:

1. resample to ``target_spacing`` / ``target_shape`` (with centred crop/pad),
2. denoise,
3. window or normalise.

Resampling comes first because models are trained on their own grid: filter
sizes and sigmas are in voxels of the *output* grid, which also keeps the
filters cheap when downsampling (the usual case for CT). Everything runs in
float32. Downsampling uses plain interpolation without an anti-aliasing
filter; a model trained on the same pipeline sees the same aliasing.

:class:`PreprocessCache` stores results on disk, so several models of one job
that share a spec load and preprocess the series once.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi  # type: ignore[import-untyped]  # no scipy-stubs in dev deps yet

from pacsnode.core.errors import PreprocessError
from pacsnode.core.layout import atomic_write
from pacsnode.models.inputspec import PreprocessSpec
from pacsnode.workers.geometry import Grid
from pacsnode.workers.volume import Volume

log = logging.getLogger(__name__)

PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class _Plan:
    """Output voxel o samples the input at index coordinate o·scale + offset
    (per axis); voxels outside ``valid`` are padding."""

    shape: tuple[int, int, int]
    scale: np.ndarray
    offset: np.ndarray
    valid: tuple[slice, slice, slice]


def _plan(shape: tuple[int, ...], spacing: tuple[float, ...], spec: PreprocessSpec) -> _Plan:
    n = np.asarray(shape, dtype=np.float64)
    sp = np.asarray(spacing, dtype=np.float64)
    if spec.target_spacing is not None:
        scale = np.asarray(spec.target_spacing, dtype=np.float64) / sp
        full = np.maximum(1, np.rint(n / scale)).astype(int)
        out = np.asarray(spec.target_shape or full, dtype=int)
        start = (full - out) // 2  # negative: padding before
        low, high = np.maximum(0, -start), np.minimum(out, full - start)
        offset = start * scale
    elif spec.target_shape is not None:
        out = np.asarray(spec.target_shape, dtype=int)
        scale = n / out
        offset = 0.5 * scale - 0.5  # align voxel edges, not centres
        low, high = np.zeros(3, dtype=int), out
    else:
        out, scale, offset = n.astype(int), np.ones(3), np.zeros(3)
        low, high = np.zeros(3, dtype=int), out
    (z, y, x), (lz, ly, lx), (hz, hy, hx) = (map(int, v) for v in (out, low, high))
    return _Plan((z, y, x), scale, offset, (slice(lz, hz), slice(ly, hy), slice(lx, hx)))


def output_geometry(volume: Volume, spec: PreprocessSpec) -> Grid:
    """The grid :func:`preprocess` produces for this volume and spec: the
    volume's orientation and Frame of Reference; ``origin`` is the patient
    position (x, y, z) of output voxel [0, 0, 0], so a model's output can be
    mapped back onto the source series (e.g. for SEG)."""
    plan = _plan(volume.array.shape, volume.spacing, spec)
    step = np.asarray(volume.spacing) * plan.scale
    # index (z, y, x) → patient: x along the row cosine, y along the column
    # cosine, z along the normal (direction rows 0, 1, 2).
    shift = plan.offset * np.asarray(volume.spacing)
    origin = np.asarray(volume.origin) + volume.direction.T @ shift[::-1]
    (sz, sy, sx), (ox, oy, oz) = map(float, step), map(float, origin)
    grid = volume.grid
    return Grid(
        plan.shape, (sz, sy, sx), (ox, oy, oz), grid.orientation, grid.frame_of_reference_uid
    )


def preprocess(volume: Volume, spec: PreprocessSpec) -> np.ndarray:
    """Resample, denoise and normalise; returns a new C-contiguous float32 array."""
    array = volume.array
    if array.ndim != 3 or array.size == 0:
        raise PreprocessError(
            f"series {volume.series_instance_uid}: expected a non-empty 3-D volume, "
            f"got shape {array.shape}"
        )
    out = _resample(array, _plan(array.shape, volume.spacing, spec), spec.interpolation_order)
    out = _denoise(out, spec)
    _normalise(out, spec, volume.series_instance_uid)
    return out


def restore(
    array: np.ndarray, volume: Volume, spec: PreprocessSpec, order: int = 1, floor: float = 0.0
) -> np.ndarray:
    """Map a model output on the grid of :func:`preprocess` (e.g. lesion
    probabilities) back onto the source volume's voxels; outside the model's
    field of view (cropped away) the result is 0.

    With ``floor`` > 0 (and linear interpolation), each source slice is
    interpolated only in the box around output values above ``floor``; the
    rest, which could only get values up to ``floor``, is 0. For a lesion
    map, mapping a 200 x 512² series back then takes a fraction of the time.
    """
    plan = _plan(volume.array.shape, volume.spacing, spec)
    if array.shape != plan.shape:
        raise PreprocessError(
            f"series {volume.series_instance_uid}: output shape {array.shape} is not "
            f"the preprocessed shape {plan.shape}"
        )
    array = np.asarray(array, dtype=np.float32)
    out = np.zeros(volume.array.shape, dtype=np.float32)
    # Source index i lies at output coordinate (i - offset) / scale. Within
    # half an output voxel of the grid the nearest edge value holds (the
    # output voxel covers it); beyond, the model did not see it: 0.
    if floor > 0 and order == 1:
        _restore_boxes(array, out, plan, floor)
    else:
        ndi.affine_transform(
            array, 1.0 / plan.scale, -plan.offset / plan.scale,
            output=out, order=order, mode="nearest",
        )  # fmt: skip
    for axis, (n_in, n_out) in enumerate(zip(volume.array.shape, plan.shape, strict=True)):
        coord = (np.arange(n_in) - plan.offset[axis]) / plan.scale[axis]
        outside = (coord < -0.5) | (coord > n_out - 0.5)
        if outside.any():
            index: list[Any] = [slice(None)] * 3
            index[axis] = outside
            out[tuple(index)] = 0.0
    return out


def _restore_boxes(array: np.ndarray, out: np.ndarray, plan: _Plan, floor: float) -> None:
    """Trilinear mapping as separable steps: for each source slice, the two
    nearest output slices blended, then a 2-D linear transform of the box
    around values above ``floor`` (with edge values held, like mode nearest)."""
    n_out = array.shape[0]
    scale, offset = plan.scale, plan.offset
    for i in range(out.shape[0]):
        c = min(max((i - offset[0]) / scale[0], 0.0), n_out - 1.0)
        k0 = int(np.floor(c))
        k1 = min(k0 + 1, n_out - 1)
        w = np.float32(c - k0)
        plane = array[k0] if w == 0 else (1 - w) * array[k0] + w * array[k1]
        rows, cols = np.nonzero(plane > floor)
        if not len(rows):
            continue
        lo, hi = [], []
        for axis, idx in ((1, rows), (2, cols)):
            first = offset[axis] + scale[axis] * (int(idx.min()) - 1)
            last = offset[axis] + scale[axis] * (int(idx.max()) + 1)
            lo.append(max(0, int(np.floor(first))))
            hi.append(min(out.shape[axis], int(np.ceil(last)) + 1))
        ndi.affine_transform(
            plane, 1.0 / scale[1:], (np.array(lo) - offset[1:]) / scale[1:],
            output=out[i, lo[0] : hi[0], lo[1] : hi[1]], order=1, mode="nearest",
        )  # fmt: skip


def _resample(array: np.ndarray, plan: _Plan, order: int) -> np.ndarray:
    region_shape = tuple(s.stop - s.start for s in plan.valid)
    if region_shape == plan.shape:
        out = np.empty(plan.shape, dtype=np.float32)
    else:
        out = np.full(plan.shape, array.min(), dtype=np.float32)
    region = out[plan.valid]
    start = plan.offset + plan.scale * np.array([s.start for s in plan.valid])
    integral = (plan.scale == 1) & (start == np.rint(start))
    if integral.all():  # pure crop/pad: copy, no interpolation
        z, y, x = (int(v) for v in start)
        dz, dy, dx = region_shape
        region[...] = array[z : z + dz, y : y + dy, x : x + dx]
    elif integral[0]:
        # Slices stay: 2-D interpolation per slice needs 4 taps instead of 8
        # (order 1) and about 2.5x less time than a 3-D transform.
        z = int(start[0])
        for k in range(region_shape[0]):
            ndi.affine_transform(
                array[z + k], plan.scale[1:], start[1:], output=region[k],
                order=order, mode="nearest",
            )  # fmt: skip
    else:
        ndi.affine_transform(
            array, plan.scale, start, output=region, order=order, mode="nearest"
        )  # fmt: skip
    return out


def _denoise(array: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    if spec.denoise == "mean":
        return ndi.uniform_filter(array, spec.denoise_size, output=np.float32, mode="nearest")
    if spec.denoise == "median":
        return ndi.median_filter(array, spec.denoise_size, mode="nearest")
    if spec.denoise == "gaussian":
        return ndi.gaussian_filter(array, spec.denoise_sigma, output=np.float32, mode="nearest")
    return array


def _normalise(array: np.ndarray, spec: PreprocessSpec, series_uid: str) -> None:
    """In place: map to [0, 1] or to mean 0 / std 1."""
    if spec.normalise == "window":
        assert spec.window is not None  # checked by the spec's validator
        center, width = spec.window
        _scale_into_unit(array, center - width / 2, center + width / 2)
    elif spec.normalise == "minmax":
        _scale_into_unit(array, float(array.min()), float(array.max()))
    elif spec.normalise == "percentile":
        low, high = np.percentile(array, PERCENTILES)
        _scale_into_unit(array, float(low), float(high))
    elif spec.normalise == "zscore":
        threshold = spec.zscore_threshold
        sample = array if threshold is None else array[array > threshold]
        if sample.size == 0:
            raise PreprocessError(
                f"series {series_uid}: no voxel above zscore_threshold {threshold}"
            )
        mean = float(sample.mean(dtype=np.float64))
        std = float(sample.std(dtype=np.float64))
        array -= np.float32(mean)
        if std > 0:
            array *= np.float32(1 / std)


def _scale_into_unit(array: np.ndarray, low: float, high: float) -> None:
    np.clip(array, low, high, out=array)
    array -= np.float32(low)
    if high > low:
        array *= np.float32(1 / (high - low))


# -- cache ---------------------------------------------------------------------

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class PreprocessCache:
    """Preprocessed volumes as ``.npy`` files under ``directory``.

    An entry is keyed by the series, the set of its SOP instances (a series
    that grew gets a new entry) and the spec's :meth:`~PreprocessSpec.cache_key`.
    Writes go to a temporary file that is renamed into place, so readers see a
    whole entry or none; concurrent writers of one key both write the same
    content and the last rename wins. Hits are read-only memory maps; misses
    return the computed array, also read-only, so callers behave the same
    either way. Nothing is evicted here: that is the owner's job.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path_for(
        self, series_instance_uid: str, sop_instance_uids: Iterable[str], spec: PreprocessSpec
    ) -> Path:
        uid = series_instance_uid.strip()
        folder = uid if len(uid) <= 64 and _UID.match(uid) else "x" + _sha256(uid)[:32]
        instances = _sha256("\n".join(sorted(set(sop_instance_uids))))
        return self.directory / folder / f"{instances[:32]}-{spec.cache_key()[:32]}.npy"

    def get_or_compute(
        self,
        volume_loader: Callable[[], Volume],
        series_instance_uid: str,
        sop_instance_uids: Iterable[str],
        spec: PreprocessSpec,
    ) -> np.ndarray:
        """The preprocessed volume; ``volume_loader`` runs only on a miss."""
        instances = set(sop_instance_uids)
        path = self.path_for(series_instance_uid, instances, spec)
        if path.exists():
            try:
                cached: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                log.warning("preprocess cache entry %s unreadable, recomputing: %s", path, exc)
            else:
                log.debug("preprocess cache hit for series %s: %s", series_instance_uid, path)
                return cached
        volume = volume_loader()
        if volume.series_instance_uid != series_instance_uid or (
            set(volume.sop_instance_uids) != instances
        ):
            raise PreprocessError(
                f"series {series_instance_uid}: the loader returned series "
                f"{volume.series_instance_uid} with {len(set(volume.sop_instance_uids))} "
                f"instances, not the {len(instances)} instances of the cache key"
            )
        result = preprocess(volume, spec)
        _write_atomically(path, result)
        result.flags.writeable = False
        log.debug("preprocess cache stored series %s: %s", series_instance_uid, path)
        return result


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _write_atomically(path: Path, array: np.ndarray) -> None:
    """One cache entry, whole or not at all (``ValueError`` for an array
    that needs pickle, which is refused)."""
    atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))
