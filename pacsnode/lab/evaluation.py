"""Held-out evaluation of pacsnode's models, and the report it writes.

The metric functions take numpy arrays and import no TensorFlow, so tests,
benchmarks and the pipeline's checks can use them cheaply. The
``evaluate_*`` functions run a model through :mod:`models.runtime`, that is in
inference mode (``training=False``) with BatchNorm's moving statistics, the
way the node will run it: figures measured with batch statistics can be far
better than what the node delivers.

- classifiers: sensitivity, specificity, precision, recall, F1, accuracy at
  the manifest's threshold, and ROC AUC (scikit-learn);
- segmentation: Dice and the 95th percentile Hausdorff distance in mm (surface
  distances with the voxel spacing), and the relative volume error;
- the out-of-distribution gate: detection rate on abnormal inputs and false
  alarm rate on normal ones at its threshold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.ndimage as ndi  # type: ignore[import-untyped]  # no scipy-stubs in dev deps yet
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from pacsnode.core.layout import atomic_write

if TYPE_CHECKING:
    from pacsnode.models.runtime import LoadedModel

Spacing = tuple[float, ...]


@dataclass
class Evaluation:
    """Metrics of one model on one held-out set; ``labels`` and ``scores``
    (classifiers and the gate) feed the ROC and PR plots."""

    model: str
    task: str
    metrics: dict[str, Any]
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None
    cases: list[dict[str, Any]] = field(default_factory=list)


# --- classifiers ---------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC, or NaN when the labels hold only one class."""
    labels = np.asarray(labels).astype(bool).ravel()
    if labels.all() or not labels.any():
        return math.nan
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


def binary_metrics(
    labels: np.ndarray, scores: np.ndarray, *, threshold: float = 0.5
) -> dict[str, Any]:
    """Confusion counts and rates at ``threshold`` (score ≥ threshold is positive)."""
    truth = np.asarray(labels).astype(bool).ravel()
    predicted = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    tp = int(np.sum(truth & predicted))
    fp = int(np.sum(~truth & predicted))
    tn = int(np.sum(~truth & ~predicted))
    fn = int(np.sum(truth & ~predicted))
    sensitivity = _ratio(tp, tp + fn)
    precision = _ratio(tp, tp + fp)
    return {
        "n": int(truth.size),
        "positives": int(truth.sum()),
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "recall": sensitivity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, truth.size),
        "roc_auc": roc_auc(truth, scores),
        "average_precision": (
            float(average_precision_score(truth, np.ravel(scores))) if truth.any() else math.nan
        ),
    }


def study_scores_from_slices(slice_scores: Sequence[np.ndarray]) -> np.ndarray:
    """A study's score from per-slice probabilities: the maximum (one lesion
    slice makes a lesion study); the baseline for the sequence classifier."""
    return np.array([float(np.max(s)) if len(s) else 0.0 for s in slice_scores])


# --- segmentation --------------------------------------------------------


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean masks; 1.0 when both are empty."""
    a = np.asarray(prediction, dtype=bool)
    b = np.asarray(truth, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.sum(a & b)) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndi.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndi.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(prediction: np.ndarray, truth: np.ndarray, spacing: Spacing) -> np.ndarray:
    """Distances in mm from each surface voxel of one mask to the nearest
    surface voxel of the other, both directions pooled."""
    a = _surface(np.asarray(prediction, dtype=bool))
    b = _surface(np.asarray(truth, dtype=bool))
    to_b = ndi.distance_transform_edt(~b, sampling=spacing)
    to_a = ndi.distance_transform_edt(~a, sampling=spacing)
    return np.concatenate([to_b[a], to_a[b]])


def hausdorff95(prediction: np.ndarray, truth: np.ndarray, spacing: Spacing) -> float:
    """95th percentile of the pooled surface distances, in mm.

    ``spacing`` is per axis, in the array's axis order ((z, y, x) for a
    volume). 0.0 when both masks are empty, infinity when only one is.
    """
    a = np.asarray(prediction, dtype=bool)
    b = np.asarray(truth, dtype=bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return math.inf
    return float(np.percentile(surface_distances(a, b, spacing), 95))


def segmentation_case(
    probabilities: np.ndarray, truth: np.ndarray, spacing: Spacing, *, threshold: float = 0.5
) -> dict[str, Any]:
    """Dice, HD95 and volumes (mm³) of one predicted probability volume."""
    prediction = probabilities >= threshold
    voxel = float(np.prod(spacing))
    true_volume = float(truth.sum()) * voxel
    predicted_volume = float(prediction.sum()) * voxel
    return {
        "dice": dice(prediction, truth),
        "hd95_mm": hausdorff95(prediction, truth, spacing),
        "true_volume_mm3": true_volume,
        "predicted_volume_mm3": predicted_volume,
        "volume_error": _ratio(predicted_volume - true_volume, true_volume),
    }


def summarise_segmentation(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over cases with a lesion (Dice is 1 by convention on empty ones,
    which would flatter the mean) and the count of empty-case false positives."""
    lesion = [c for c in cases if c["true_volume_mm3"] > 0]
    empty = [c for c in cases if c["true_volume_mm3"] == 0]
    hd = [c["hd95_mm"] for c in lesion if math.isfinite(c["hd95_mm"])]
    return {
        "cases": len(cases),
        "lesion_cases": len(lesion),
        "mean_dice": float(np.mean([c["dice"] for c in lesion])) if lesion else math.nan,
        "median_dice": float(np.median([c["dice"] for c in lesion])) if lesion else math.nan,
        "mean_hd95_mm": float(np.mean(hd)) if hd else math.nan,
        "missed_lesion_cases": sum(1 for c in lesion if c["predicted_volume_mm3"] == 0),
        "mean_abs_volume_error": (
            float(np.mean([abs(c["volume_error"]) for c in lesion])) if lesion else math.nan
        ),
        "false_positive_empty_cases": sum(1 for c in empty if c["predicted_volume_mm3"] > 0),
    }


# --- out-of-distribution gate ---------------------------------------------


def gate_rates(
    normal_errors: np.ndarray, abnormal_errors: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Detection rate (abnormal error > threshold) and false alarm rate
    (normal error > threshold)."""
    normal = np.asarray(normal_errors, dtype=np.float64)
    abnormal = np.asarray(abnormal_errors, dtype=np.float64)
    return {
        "threshold": float(threshold),
        "normal": int(normal.size),
        "abnormal": int(abnormal.size),
        "detection_rate": _ratio(float(np.sum(abnormal > threshold)), abnormal.size),
        "false_alarm_rate": _ratio(float(np.sum(normal > threshold)), normal.size),
    }


# --- model-level evaluation (runs TensorFlow through models.runtime) --------


def _binary_evaluation(
    model: LoadedModel, task: str, labels: np.ndarray, scores: np.ndarray, threshold: float
) -> Evaluation:
    metrics = binary_metrics(labels, scores, threshold=threshold)
    return Evaluation(model.name, task, metrics, labels=np.asarray(labels), scores=scores)


def evaluate_slice_classifier(
    model: LoadedModel, slices: np.ndarray, labels: np.ndarray, *, threshold: float = 0.5
) -> Evaluation:
    from pacsnode.models import runtime

    scores = runtime.classify_slices(model, slices)
    return _binary_evaluation(model, "classification", labels, scores, threshold)


def evaluate_sequence_classifier(
    model: LoadedModel,
    volumes: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    threshold: float = 0.5,
) -> Evaluation:
    from pacsnode.models import runtime

    scores = runtime.classify_sequences(model, volumes)
    return _binary_evaluation(model, "sequence", labels, scores, threshold)


def evaluate_segmenter(
    model: LoadedModel,
    volumes: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    spacings: Sequence[Spacing],
    *,
    threshold: float = 0.5,
) -> Evaluation:
    from pacsnode.models import runtime

    cases = [
        segmentation_case(runtime.segment_volume(model, v), m.astype(bool), s, threshold=threshold)
        for v, m, s in zip(volumes, masks, spacings, strict=True)
    ]
    return Evaluation(model.name, "segmentation", summarise_segmentation(cases), cases=cases)


def evaluate_gate(
    model: LoadedModel,
    normal_volumes: Sequence[np.ndarray],
    abnormal_volumes: Sequence[np.ndarray],
    *,
    threshold: float,
) -> Evaluation:
    from pacsnode.models import runtime

    normal = np.array([runtime.reconstruction_error(model, v) for v in normal_volumes])
    abnormal = np.array([runtime.reconstruction_error(model, v) for v in abnormal_volumes])
    metrics = gate_rates(normal, abnormal, threshold)
    labels = np.concatenate([np.zeros(normal.size), np.ones(abnormal.size)])
    scores = np.concatenate([normal, abnormal])
    metrics["roc_auc"] = roc_auc(labels, scores)
    return Evaluation(model.name, "anomaly", metrics, labels=labels, scores=scores)


# --- report --------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """numpy scalars → Python; NaN and infinity → null (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plot_curves(labels: np.ndarray, scores: np.ndarray, title: str, out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    paths = []
    for kind, xs, ys, xlabel, ylabel, label in (
        ("roc", fpr, tpr, "1 - specificity", "sensitivity", f"AUC {roc_auc(labels, scores):.3f}"),
        (
            "pr",
            recall,
            precision,
            "recall",
            "precision",
            f"AP {average_precision_score(labels, scores):.3f}",
        ),
    ):
        fig = Figure(figsize=(4.5, 4.5), dpi=100)
        ax = fig.add_subplot()
        ax.plot(xs, ys, drawstyle="steps-post", label=label)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=f"{title} {kind}")
        ax.legend(loc="lower right")
        path = out_dir / f"{kind}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def write_report(evaluation: Evaluation, out_dir: str | Path) -> list[Path]:
    """Write ``report.json`` and, for scored tasks with both classes, ``roc.png``
    and ``pr.png`` into ``out_dir``; return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": evaluation.model,
        "task": evaluation.task,
        "mode": "inference (training=False)",
        "note": "bundled models are for demonstration, not clinical use",
        "metrics": evaluation.metrics,
        "cases": evaluation.cases,
    }
    path = out / "report.json"
    atomic_write(path, json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    paths = [path]
    labels, scores = evaluation.labels, evaluation.scores
    if labels is not None and scores is not None and 0 < np.sum(labels) < len(labels):
        paths += _plot_curves(np.asarray(labels, bool), np.asarray(scores), evaluation.model, out)
    return paths
