"""Phantom data for the bundled models' recipes and their held-out evaluation.

Synthetic data, for training and evaluating demonstration models only.

Every training or held-out CT is a phantom study generated directly on the
grid of the model's input spec (``pixel_mm`` x ``pixel_mm`` pixels, slices
``slice_mm`` apart), wrapped in a :class:`~workers.volume.Volume` and passed
through :func:`workers.preprocess.preprocess`, the function the node runs on
a received series: training and inference share the windowing code, and the
resampling when a model's spec differs from the grid (the sequence model).

Seeds are fixed and disjoint: training studies use seeds below
:data:`VALIDATION_SEED`, validation studies (early stopping, thresholds)
start at :data:`VALIDATION_SEED`, held-out studies (``pacsnode evaluate``) at
:data:`HELD_OUT_SEED`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from pacsnode.lab.phantom import SeriesImage, Study, StudySpec, generate_study
from pacsnode.models.inputspec import PreprocessSpec
from pacsnode.workers.preprocess import preprocess
from pacsnode.workers.volume import Volume

TRAIN_SEED = 0
GATE_TRAIN_SEED = 20_000  # normal studies for the gate, apart from the lesion models' seeds
VALIDATION_SEED = 50_000
HELD_OUT_SEED = 100_000

# MR phantoms are stored with the brightest tissue at about 3000 of 4095 and no
# rescale (models/phantom/dicom.py): what a node reads from such a series.
MR_STORED_SCALE = 3000.0
MR_STORED_MAX = 4095.0

# Batch sampler as models.training expects it.
Sampler = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class CtGrid:
    """A phantom CT grid: ``size`` x ``size`` pixels of ``pixel_mm`` and
    ``slices`` slices ``slice_mm`` apart, centred like the phantom's default."""

    size: int
    slices: int
    pixel_mm: float
    slice_mm: float

    def study_spec(
        self,
        seed: int,
        *,
        lesions: int | None,
        noise: float = 1.0,
        modalities: tuple[str, ...] = ("CT",),
    ) -> StudySpec:
        return StudySpec(
            seed=seed,
            modalities=modalities,
            size=self.size,
            slices=self.slices,
            fov_mm=self.size * self.pixel_mm,
            z_extent_mm=self.slices * self.slice_mm,
            lesions=lesions,
            noise=noise,
        )

    @classmethod
    def covering(cls, spacing: Sequence[float], fov_mm: float, z_extent_mm: float) -> CtGrid:
        """The grid of this spacing (z, y, x) nearest to the given extents."""
        slice_mm, pixel_mm = float(spacing[0]), float(spacing[1])
        return cls(
            size=max(8, round(fov_mm / pixel_mm)),
            slices=max(1, round(z_extent_mm / slice_mm)),
            pixel_mm=pixel_mm,
            slice_mm=slice_mm,
        )


def volume_of(image: SeriesImage, values: np.ndarray | None = None) -> Volume:
    """A phantom series as the node's loader would give it (``values``
    replaces the pixel data, e.g. a mask or MR stored values)."""
    grid = image.grid
    array = image.array if values is None else values
    return Volume(
        array=np.asarray(array, dtype=np.float32),
        grid=replace(grid, frame_of_reference_uid="phantom"),
        series_instance_uid=image.series_instance_uid,
        modality=image.modality,
        sop_instance_uids=tuple(image.sop_instance_uid(k) for k in range(grid.shape[0])),
        units="HU" if image.modality == "CT" else "",
    )


def mr_as_stored(image: SeriesImage) -> Volume:
    """An MR phantom series with the stored values a node reads from its
    DICOM files (no rescale, so they pass for HU if fed to a CT model)."""
    stored = np.clip(np.rint(image.array * MR_STORED_SCALE), 0, MR_STORED_MAX)
    return volume_of(image, stored.astype(np.float32))


def mask_spec(spec: PreprocessSpec) -> PreprocessSpec:
    """The spec's geometry with nearest-neighbour sampling and no intensity step."""
    return spec.model_copy(update={"normalise": "none", "window": None, "interpolation_order": 0})


def mask_on(image: SeriesImage, mask: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A boolean mask on ``image``'s grid resampled like ``preprocess(image, spec)``."""
    return preprocess(volume_of(image, mask.astype(np.float32)), mask_spec(spec)) > 0.5


def fit_size(x: np.ndarray, size: int) -> np.ndarray:
    """Centre crop or pad (with 0, air after windowing) the last two axes to ``size``."""
    out = x
    for axis in (-2, -1):
        n = out.shape[axis]
        if n > size:
            start = (n - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=axis)
        elif n < size:
            pad = [(0, 0)] * out.ndim
            pad[axis] = ((size - n) // 2, size - n - (size - n) // 2)
            out = np.pad(out, pad)
    return out


@dataclass
class SliceSet:
    """Preprocessed slices of several studies, stacked: ``x`` (N, S, S)
    float16 in [0, 1], ``masks`` (N, S, S) bool or None, lesion voxels per
    slice, and the study index of each slice."""

    x: np.ndarray
    masks: np.ndarray | None
    counts: np.ndarray
    study: np.ndarray
    study_labels: np.ndarray  # per study: 1.0 with a lesion

    def study_slices(self, index: int) -> np.ndarray:
        return self.x[self.study == index].astype(np.float32)

    @property
    def studies(self) -> int:
        return len(self.study_labels)


MIN_LESION_AREA_MM2 = 22.5  # a slice is a lesion slice from this much lesion on it


def min_voxels(pixel_mm: float) -> int:
    """Lesion voxels that make a slice positive on a grid of ``pixel_mm``
    (10 at 1.5 mm): slices that only graze a lesion are not lesion slices."""
    return max(1, round(MIN_LESION_AREA_MM2 / pixel_mm**2))


def lesion_schedule(seed: int) -> int | None:
    """Three training studies in four have lesions (1-5, from the seed)."""
    return 0 if seed % 4 == 3 else None


def noise_for(seed: int) -> float:
    """Image noise 0.5-1.2 x the phantom's default: resampled clinical CT is
    usually smoother than the phantom's own grid, never much noisier."""
    return float(np.random.default_rng([seed, 7]).uniform(0.5, 1.2))


def generate_studies(
    grid: CtGrid,
    seeds: Sequence[int],
    lesions: Callable[[int], int | None],
    noise: Callable[[int], float],
    *,
    modalities: tuple[str, ...] = ("CT",),
    progress: Callable[[], None] | None = None,
) -> Iterator[Study]:
    for seed in seeds:
        yield generate_study(
            grid.study_spec(seed, lesions=lesions(seed), noise=noise(seed), modalities=modalities)
        )
        if progress is not None:
            progress()


def ct_slices(
    studies: Sequence[Study] | Iterator[Study],
    spec: PreprocessSpec,
    *,
    size: int,
    keep_masks: bool,
) -> SliceSet:
    """Preprocess each study's CT with ``spec`` and stack its slices, cropped
    or padded to ``size`` x ``size``; lesion masks follow the same resampling."""
    xs, masks, counts, index, labels = [], [], [], [], []
    for i, study in enumerate(studies):
        ct = study.series["CT"]
        x = preprocess(volume_of(ct), spec)
        mask = mask_on(ct, study.lesion_mask > 0, spec)
        x, mask = fit_size(x, size), fit_size(mask, size)
        xs.append(x.astype(np.float16))
        counts.append(mask.reshape(len(mask), -1).sum(axis=1))
        if keep_masks:
            masks.append(mask)
        index.append(np.full(len(x), i))
        labels.append(float(bool(study.lesions)))
    return SliceSet(
        x=np.concatenate(xs),
        masks=np.concatenate(masks) if keep_masks else None,
        counts=np.concatenate(counts),
        study=np.concatenate(index),
        study_labels=np.array(labels, dtype=np.float32),
    )


# --- batch samplers ----------------------------------------------------------


def balanced_slices(data: SliceSet, min_voxels: int) -> Sampler:
    """Half the batch lesion slices (≥ ``min_voxels`` lesion voxels), half
    slices without any lesion voxel; slices that only graze a lesion are left
    out, their label would be a coin toss."""
    positive = np.flatnonzero(data.counts >= min_voxels)
    negative = np.flatnonzero(data.counts == 0)
    if not len(positive) or not len(negative):
        raise ValueError("training data needs slices with and without lesions")

    def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        half = n // 2
        index = np.concatenate([rng.choice(positive, half), rng.choice(negative, n - half)])
        return data.x[index].astype(np.float32), (data.counts[index] >= min_voxels).astype(
            np.float32
        )

    return sample


def lesion_patches(
    data: SliceSet,
    patch: int,
    lesion_fraction: float = 0.6,
    body_fraction: float = 0.0,
    hard: np.ndarray | None = None,
    hard_fraction: float = 0.0,
) -> Sampler:
    """``patch`` x ``patch`` crops with their masks: a ``lesion_fraction`` share
    around a random lesion voxel (off centre), the rest anywhere; of those, a
    ``body_fraction`` share is centred on a random voxel inside the body
    (above air after windowing), where the look-alikes of lesions are, and a
    ``hard_fraction`` share around one of the ``hard`` voxels (rows of slice
    index, y, x: e.g. where a first model found a lesion that is not there)."""
    assert data.masks is not None
    masks = data.masks
    lesion_slices = np.flatnonzero(data.counts > 0)
    size = data.x.shape[-1]
    patch = min(patch, size)

    def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs = np.empty((n, patch, patch), dtype=np.float32)
        ys = np.empty((n, patch, patch), dtype=np.float32)
        for i in range(n):
            if len(lesion_slices) and rng.random() < lesion_fraction:
                s = int(rng.choice(lesion_slices))
                rows, cols = np.nonzero(masks[s])
                j = int(rng.integers(len(rows)))
                jitter = rng.integers(-patch // 3, patch // 3 + 1, size=2)
                cy, cx = rows[j] + jitter[0], cols[j] + jitter[1]
            elif hard is not None and len(hard) and rng.random() < hard_fraction:
                s, cy, cx = (int(v) for v in hard[rng.integers(len(hard))])
                jitter = rng.integers(-patch // 3, patch // 3 + 1, size=2)
                cy, cx = cy + jitter[0], cx + jitter[1]
            else:
                s = int(rng.integers(len(data.x)))
                cy, cx = rng.integers(0, size, size=2)
                if body_fraction and rng.random() < body_fraction:
                    rows, cols = np.nonzero(data.x[s] > 0)
                    if len(rows):
                        j = int(rng.integers(len(rows)))
                        cy, cx = rows[j], cols[j]
            y0 = int(np.clip(cy - patch // 2, 0, size - patch))
            x0 = int(np.clip(cx - patch // 2, 0, size - patch))
            xs[i] = data.x[s, y0 : y0 + patch, x0 : x0 + patch]
            ys[i] = masks[s, y0 : y0 + patch, x0 : x0 + patch]
        return xs, ys

    return sample


def labelled_patches(data: SliceSet, patch: int, min_voxels: int) -> Sampler:
    """Patches as :func:`lesion_patches` draws them (40 % around a lesion,
    most of the others inside the body), labelled 1 when at least
    ``min_voxels`` lesion voxels lie in the patch and 0 when none does;
    patches with a sliver of lesion (fewer voxels) are drawn again, their
    label would be a coin toss."""
    inner = lesion_patches(data, patch, lesion_fraction=0.4, body_fraction=0.7)

    def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys, have = [], [], 0
        while have < n:
            x, masks = inner(rng, n)
            counts = masks.reshape(n, -1).sum(axis=1)
            keep = (counts == 0) | (counts >= min_voxels)
            xs.append(x[keep])
            ys.append((counts[keep] >= min_voxels).astype(np.float32))
            have += int(keep.sum())
        return np.concatenate(xs)[:n], np.concatenate(ys)[:n]

    return sample


def random_slices(data: SliceSet) -> Sampler:
    """Any slice (the gate's normal training data); ``y`` is unused."""

    def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        index = rng.integers(0, len(data.x), n)
        x = data.x[index].astype(np.float32)
        return x, x

    return sample


def balanced_volumes(volumes: Sequence[np.ndarray], labels: np.ndarray) -> Sampler:
    """Half the batch lesion studies, half normal ones."""
    positive = np.flatnonzero(labels > 0.5)
    negative = np.flatnonzero(labels <= 0.5)

    def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        half = n // 2
        index = np.concatenate([rng.choice(positive, half), rng.choice(negative, n - half)])
        x = np.stack([volumes[i] for i in index]).astype(np.float32)
        return x, labels[index].astype(np.float32)

    return sample


def draw(
    sampler: Sampler, seed: int, batches: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed validation set: ``batches`` batches from ``sampler``."""
    rng = np.random.default_rng([seed, 3])
    parts = [sampler(rng, batch_size) for _ in range(batches)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
