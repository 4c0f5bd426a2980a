"""The bundled CT+PT fusion model: phantom data, training and its manifest.

Synthetic data, for training and evaluating a demonstration model only.

The label is "FDG-avid lesion": the study holds a lesion that takes up the
tracer. CT shows lesions but not their uptake (metastases are usually avid,
cysts never, granulomas and renal carcinomas sometimes); PT shows uptake but
also physiological foci in bowel, muscle and brown fat that are not lesions
(models/phantom/lesions.py). Only both together say "this hot spot lies on a
lesion", so the label needs fusion.

Every study is a phantom CT+PT generated with the CT directly on the model's
grid (``PIXEL_MM`` pixels, ``SLICE_MM`` slices) and the PT on its own coarser
grid in the same Frame of Reference; the PT reaches the CT grid through
:func:`workers.fusion.stack_roles`, the code the node runs on a received
study. Seeds are disjoint from the other recipes' (``FUSION_*_SEED``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pacsnode.lab import recipe_data as data
from pacsnode.lab.evaluation import roc_auc
from pacsnode.lab.phantom import Study, StudySpec, generate_study
from pacsnode.models.inputspec import PreprocessSpec
from pacsnode.workers.fusion import decision_scores, stack_roles

NAME = "ct-pt-avid-fusion"
VERSION = "1.0.0"
ROLES = ("ct", "pt")
FUSION_TRAIN_SEED = 30_000
FUSION_VALIDATION_SEED = 60_000
FUSION_HELD_OUT_SEED = 110_000
# A local concept (PS3.16 §8): no standard code says "lesion with FDG uptake".
AVID_LESION = {
    "value": "AVIDLESION",
    "scheme_designator": "99PACSNODE",
    "meaning": "FDG-avid lesion",
}


@dataclass(frozen=True)
class FusionScale:
    """Grid, data and network sizes of a training run; :data:`TINY` for smoke tests."""

    pixel_mm: float = 4.0
    slice_mm: float = 8.0
    size: int = 96  # CT pixels (384 mm)
    slices: int = 50  # 400 mm
    pt_size: int = 48  # PT pixels over 1.25 x the CT field (10 mm)
    train_studies: int = 96
    val_studies: int = 32
    base_filters: int = 8
    depth: int = 3
    steps: int = 1000
    batch_size: int = 32


FULL = FusionScale()
TINY = FusionScale(pixel_mm=8.0, slice_mm=16.0, size=48, slices=25, pt_size=24,
                   train_studies=4, val_studies=4, base_filters=4, depth=2, steps=20)  # fmt: skip


def ct_spec(scale: FusionScale = FULL) -> PreprocessSpec:
    return PreprocessSpec(
        target_spacing=(scale.slice_mm, scale.pixel_mm, scale.pixel_mm),
        normalise="window",
        window=(40.0, 400.0),
    )


def pt_spec() -> PreprocessSpec:
    """Intensity only (the PT is resampled onto the CT grid first); the
    percentile scaling makes the input independent of dose and weight."""
    return PreprocessSpec(normalise="percentile")


def study_spec(scale: FusionScale, seed: int, lesions: int | None) -> StudySpec:
    return StudySpec(
        seed=seed,
        modalities=("CT", "PT"),
        size=scale.size,
        slices=scale.slices,
        fov_mm=scale.size * scale.pixel_mm,
        z_extent_mm=scale.slices * scale.slice_mm,
        lesions=lesions,
        pt_size=scale.pt_size,
        noise=data.noise_for(seed),
    )


@dataclass(frozen=True)
class FusionCase:
    """One study: the (z, y, x, 2) input stack, per-slice labels, study label."""

    seed: int
    stack: np.ndarray
    slice_labels: np.ndarray
    label: bool
    # (z, y / f, x / f): does an avid lesion touch each cell of the heads'
    # logit maps (f = 2**depth)? Dense targets for training only.
    cell_labels: np.ndarray | None = None


def avid_slices(study: Study) -> np.ndarray:
    """Per CT slice: does an FDG-avid lesion cross it?"""
    avid = [lesion.label for lesion in study.lesions if lesion.avid]
    return np.asarray(np.isin(study.lesion_mask, avid).any(axis=(1, 2)))


def case_of(study: Study, scale: FusionScale) -> FusionCase:
    volumes = {"ct": data.volume_of(study.series["CT"]), "pt": data.volume_of(study.series["PT"])}
    specs = {"ct": ct_spec(scale), "pt": pt_spec()}
    stack, _ = stack_roles(volumes, ROLES, "ct", specs)
    if study.lesion_mask.shape != stack.shape[:3]:  # the CT is generated on the model grid
        raise AssertionError(f"lesion mask {study.lesion_mask.shape} is not on {stack.shape}")
    avid = np.isin(study.lesion_mask, [x.label for x in study.lesions if x.avid])
    f = 2**scale.depth
    z, y, x = avid.shape
    if y % f or x % f:
        raise AssertionError(f"slices {y}x{x} are not a multiple of {f}")
    cells = np.asarray(avid.reshape(z, y // f, f, x // f, f).any(axis=(2, 4)))
    labels = np.asarray(avid.any(axis=(1, 2)))
    return FusionCase(study.spec.seed, stack, labels, bool(labels.any()), cells)


def lesion_schedule(seed: int) -> int | None:
    """Every study has a lesion, so "is there a lesion?" (which CT alone
    answers) does not answer "is there an avid one?": one lesion in two
    studies of three, two in the third."""
    return 2 if seed % 3 == 2 else 1


def cases(scale: FusionScale, first_seed: int, count: int) -> list[FusionCase]:
    return [
        case_of(generate_study(study_spec(scale, seed, lesion_schedule(seed))), scale)
        for seed in range(first_seed, first_seed + count)
    ]


def params(scale: FusionScale) -> dict[str, Any]:
    return {"base_filters": scale.base_filters, "depth": scale.depth, "dropout": 0.2}


def predict_cases(model: Any, items: Sequence[FusionCase], multiple: int) -> list[np.ndarray]:
    """Per-slice ``(z, 3)`` head probabilities of each case, inference mode."""
    out = []
    for case in items:
        stack = case.stack
        pad_y, pad_x = (-stack.shape[1]) % multiple, (-stack.shape[2]) % multiple
        stack = np.pad(stack, ((0, 0), (0, pad_y), (0, pad_x), (0, 0)))
        out.append(np.asarray(model(stack, training=False), np.float64))
    return out


@dataclass(frozen=True)
class VariantScores:
    """Study scores of the four variants, one entry per case."""

    labels: np.ndarray
    ct: np.ndarray
    pt: np.ndarray
    decision: np.ndarray
    feature: np.ndarray

    def aucs(self) -> dict[str, float]:
        return {
            k: roc_auc(self.labels, getattr(self, k)) for k in ("ct", "pt", "decision", "feature")
        }


def variant_scores(
    items: Sequence[FusionCase], slice_probabilities: Sequence[np.ndarray], weights: Sequence[float]
) -> VariantScores:
    rows = [
        (p[:, 0].max(), p[:, 1].max(), decision_scores(p[:, :2], weights).max(), p[:, 2].max())
        for p in slice_probabilities
    ]
    ct, pt, decision, feature = (np.asarray(v) for v in zip(*rows, strict=True))
    return VariantScores(np.asarray([c.label for c in items]), ct, pt, decision, feature)


def fit_decision_weights(
    items: Sequence[FusionCase], slice_probabilities: Sequence[np.ndarray]
) -> tuple[float, float]:
    """(w_ct, w_pt), summing to 1, with the best validation AUC of the
    decision-level combination (ties: the most even split)."""
    best, best_auc = (0.5, 0.5), -math.inf
    for w in np.linspace(0.0, 1.0, 21):
        weights = (round(float(w), 2), round(1.0 - float(w), 2))
        auc = variant_scores(items, slice_probabilities, weights).aucs()["decision"]
        closer = abs(weights[0] - 0.5) < abs(best[0] - 0.5)
        if auc > best_auc + 1e-9 or (abs(auc - best_auc) <= 1e-9 and closer):
            best, best_auc = weights, auc
    return best
