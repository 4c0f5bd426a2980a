"""``pacsnode evaluate``: installed models on held-out phantom studies.

Synthetic held-out data (seeds from :data:`models.recipe_data.HELD_OUT_SEED`,
never used in training or validation), run the way the node runs a series:
the model comes from the registry (manifest checks, weights SHA-256) and
:mod:`models.runtime` in inference mode; its input is
:func:`workers.preprocess.preprocess` with the manifest's spec;
segmentation goes through :func:`workers.infer.run_model` (threshold, mask
mapped back onto the series' voxels) and the gate through
:func:`workers.infer.gate_score`.

The held-out CT studies lie on the finest grid of the evaluated models'
specs (1.5 mm pixels, 4 mm slices for the bundled models) over 400 x 400 mm:
half have 1-5 lesions, half none. The gate also sees the phantom's MR T1 and
T2 series fed as if they were CT (their stored values read as HU), and
noise volumes; its false alarms are counted on the lesion-free CT studies.
Fusion models are evaluated on held-out CT+PT studies (models.fusion_eval).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi  # type: ignore[import-untyped]  # no scipy-stubs in dev deps yet
from rich.progress import Progress

from pacsnode.lab import recipe_data as data
from pacsnode.lab.evaluation import (
    Evaluation,
    binary_metrics,
    gate_rates,
    roc_auc,
    segmentation_case,
    summarise_segmentation,
    write_report,
)
from pacsnode.lab.fusion_eval import evaluate_fusion
from pacsnode.models.inputspec import PreprocessSpec
from pacsnode.models.registry import RegisteredModel, Registry
from pacsnode.workers.geometry import Grid
from pacsnode.workers.preprocess import preprocess
from pacsnode.workers.volume import Volume

FOV_MM = 400.0
Z_EXTENT_MM = 400.0

# The bundled models' targets, on held-out data.
AUC_TARGET = 0.97
DICE_TARGET = 0.85
DETECTION_TARGET = 0.99
FALSE_ALARM_LIMIT = 0.02


@dataclass
class _Scores:
    """What one model gave on the held-out set, gathered study by study."""

    labels: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    slice_labels: list[np.ndarray] = field(default_factory=list)
    slice_scores: list[np.ndarray] = field(default_factory=list)
    cases: list[dict[str, Any]] = field(default_factory=list)
    normal: list[float] = field(default_factory=list)  # gate: lesion-free CT
    lesion_ct: list[float] = field(default_factory=list)
    mr: list[float] = field(default_factory=list)
    noise: list[float] = field(default_factory=list)


def held_out_grid(models: Sequence[RegisteredModel]) -> data.CtGrid:
    """The finest spacing any of the models asks for, over 400 x 400 x 400 mm."""
    spacings = [
        m.manifest.input.preprocess.target_spacing
        for m in models
        if m.manifest.input.preprocess.target_spacing is not None
    ]
    if not spacings:
        spacing: Sequence[float] = (4.0, 1.5, 1.5)
    else:
        spacing = (min(s[0] for s in spacings), min(min(s[1], s[2]) for s in spacings))
        spacing = (spacing[0], spacing[1], spacing[1])
    return data.CtGrid.covering(spacing, FOV_MM, Z_EXTENT_MM)


def _inputs(volume: Volume) -> Callable[[PreprocessSpec], np.ndarray]:
    """``input_for`` as the node has it: one preprocessing per spec and series."""
    cache: dict[str, np.ndarray] = {}

    def input_for(spec: PreprocessSpec) -> np.ndarray:
        key = spec.cache_key()
        if key not in cache:
            cache[key] = preprocess(volume, spec)
        return cache[key]

    return input_for


def _loaded(model: RegisteredModel) -> Any:
    from pacsnode.workers.infer import load_for_inference

    return load_for_inference(model)


def _noise_volume(grid: data.CtGrid, index: int) -> Volume:
    """Not a CT: Gaussian or uniform noise in HU, some of it smoothed, centred
    in the soft-tissue window (noise entirely below or above the window is a
    constant image after windowing, which no reconstruction error can tell
    from an empty field of view)."""
    rng = np.random.default_rng([data.HELD_OUT_SEED, 99, index])
    shape = (grid.slices, grid.size, grid.size)
    kind = index % 3
    if kind == 0:
        array = rng.normal(rng.uniform(-100, 200), rng.uniform(30, 400), shape)
    elif kind == 1:
        array = rng.uniform(-1024, 3071, shape)
    else:
        array = ndi.gaussian_filter(rng.normal(0, 1, shape), sigma=(0, 2, 2))
        array = array / array.std() * rng.uniform(50, 400) + rng.uniform(-100, 200)
    return Volume(
        array=array.astype(np.float32),
        grid=Grid(
            shape,
            (grid.slice_mm, grid.pixel_mm, grid.pixel_mm),
            (0.0, 0.0, 0.0),
            frame_of_reference_uid="noise",
        ),
        series_instance_uid=f"2.25.{index + 1}",
        modality="CT",
        sop_instance_uids=tuple(f"2.25.{index + 1}.{k}" for k in range(shape[0])),
        units="HU",
    )


def _run_ct(
    model: RegisteredModel,
    study: Any,
    volume: Volume,
    input_for: Callable[[PreprocessSpec], np.ndarray],
    scores: _Scores,
) -> None:
    from pacsnode.models import runtime
    from pacsnode.workers.infer import gate_score, run_model

    m = model.manifest
    has_lesion = bool(study.lesions)
    truth = study.lesion_mask > 0
    if m.task == "classification":
        x = input_for(m.input.preprocess)
        per_slice = runtime.classify_slices(_loaded(model), x, batch_size=m.input.batch_size)
        scores.labels.append(float(has_lesion))
        scores.scores.append(float(np.max(per_slice)) if len(per_slice) else 0.0)
        ct = study.series["CT"]
        on_grid = data.mask_on(ct, truth, m.input.preprocess)
        spec = m.input.preprocess.target_spacing
        pixel = spec[1] if spec is not None else float(ct.grid.spacing[1])
        counts = on_grid.reshape(len(on_grid), -1).sum(axis=1)
        keep = (counts == 0) | (counts >= data.min_voxels(pixel))  # grazing slices: neither
        scores.slice_labels.append((counts[keep] > 0).astype(np.float32))
        scores.slice_scores.append(per_slice[keep])
    elif m.task == "sequence":
        x = input_for(m.input.preprocess)
        scores.labels.append(float(has_lesion))
        scores.scores.append(runtime.classify_sequence(_loaded(model), x))
    elif m.task == "segmentation":
        result = run_model(model, volume, input_for, None)
        mask = result.masks.get(1, np.zeros(truth.shape, dtype=bool))
        scores.cases.append(
            {
                "seed": study.spec.seed,
                **segmentation_case(mask.astype(np.float32), truth, volume.spacing),
            }
        )
    elif m.task == "anomaly":
        _ood, error = gate_score(model, input_for)
        (scores.lesion_ct if has_lesion else scores.normal).append(error)


def _evaluation(model: RegisteredModel, s: _Scores) -> Evaluation:
    m = model.manifest
    name = m.name
    if m.task in ("classification", "sequence"):
        labels, values = np.array(s.labels), np.array(s.scores)
        metrics = binary_metrics(labels, values, threshold=m.thresholds.positive)
        metrics["level"] = "study"
        if s.slice_scores:
            slice_labels = np.concatenate(s.slice_labels)
            slice_scores = np.concatenate(s.slice_scores)
            metrics["slice_roc_auc"] = roc_auc(slice_labels, slice_scores)
            metrics["slices"] = int(slice_labels.size)
        metrics["target"] = f"ROC AUC >= {AUC_TARGET}"
        metrics["target_met"] = bool(metrics["roc_auc"] >= AUC_TARGET)
        return Evaluation(name, m.task, metrics, labels=labels, scores=values)
    if m.task == "segmentation":
        metrics = summarise_segmentation(s.cases)
        metrics["target"] = f"mean Dice >= {DICE_TARGET} on lesion studies"
        metrics["target_met"] = bool(metrics["mean_dice"] >= DICE_TARGET)
        return Evaluation(name, m.task, metrics, cases=s.cases)
    threshold = m.thresholds.ood_reconstruction_error
    assert threshold is not None
    abnormal = np.array(s.mr + s.noise)
    normal = np.array(s.normal)
    metrics = gate_rates(normal, abnormal, threshold)
    metrics["mr_as_ct_volumes"] = len(s.mr)
    metrics["mr_as_ct_detection_rate"] = gate_rates(normal, np.array(s.mr), threshold)[
        "detection_rate"
    ]
    metrics["noise_volumes"] = len(s.noise)
    metrics["noise_detection_rate"] = gate_rates(normal, np.array(s.noise), threshold)[
        "detection_rate"
    ]
    lesion = np.array(s.lesion_ct)
    metrics["lesion_ct_volumes"] = int(lesion.size)
    metrics["lesion_ct_flag_rate"] = float(np.mean(lesion > threshold)) if lesion.size else math.nan
    labels = np.concatenate([np.zeros(normal.size), np.ones(abnormal.size)])
    values = np.concatenate([normal, abnormal])
    metrics["roc_auc"] = roc_auc(labels, values)
    metrics["target"] = (
        f"detection >= {DETECTION_TARGET:.0%}, false alarms <= {FALSE_ALARM_LIMIT:.0%}"
    )
    metrics["target_met"] = bool(
        metrics["detection_rate"] >= DETECTION_TARGET
        and metrics["false_alarm_rate"] <= FALSE_ALARM_LIMIT
    )
    cases = [{"kind": "normal CT", "error": e} for e in s.normal]
    cases += [{"kind": "lesion CT", "error": e} for e in s.lesion_ct]
    cases += [{"kind": "MR as CT", "error": e} for e in s.mr]
    cases += [{"kind": "noise", "error": e} for e in s.noise]
    return Evaluation(name, m.task, metrics, labels=labels, scores=values, cases=cases)


def evaluate(
    registry: Registry,
    names: Sequence[str],
    *,
    studies: int = 40,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> list[Evaluation]:
    """Evaluate the named installed models on ``studies`` held-out CT studies
    (half with lesions); the gate also on ``studies`` MR-as-CT and ``studies``
    noise volumes. Writes ``<out_dir>/<name>/report.json`` (+ ROC/PR PNGs)."""
    models = []
    for name in names:
        model = registry.get(name)
        if model is None:
            raise LookupError(f"no model named {name!r} is installed in {registry.models_dir}")
        models.append(model)
    fusion = [m for m in models if m.manifest.task == "fusion"]
    models = [m for m in models if m.manifest.task != "fusion"]
    fused = [evaluate_fusion(m, studies, progress=progress) for m in fusion]
    if not models:
        if out_dir is not None:
            for result in fused:
                write_report(result, Path(out_dir) / result.model)
        return fused
    grid = held_out_grid(models)
    scores = {m.key: _Scores() for m in models}
    gates = [m for m in models if m.manifest.task == "anomaly"]
    mr_studies = math.ceil(studies / 2) if gates else 0
    noise_volumes = studies if gates else 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("held-out CT", total=studies)
        for i in range(studies):
            seed = data.HELD_OUT_SEED + i
            study = data.generate_study(grid.study_spec(seed, lesions=None if i % 2 == 0 else 0))
            volume = data.volume_of(study.series["CT"])
            input_for = _inputs(volume)
            for model in models:
                _run_ct(model, study, volume, input_for, scores[model.key])
            bar.advance(task)
        if gates:
            from pacsnode.workers.infer import gate_score

            task = bar.add_task("MR as CT, noise", total=mr_studies + noise_volumes)
            for i in range(mr_studies):
                study = data.generate_study(
                    grid.study_spec(data.HELD_OUT_SEED + i, lesions=None, modalities=("MR",))
                )
                for key in ("MR_T1", "MR_T2"):
                    input_for = _inputs(data.mr_as_stored(study.series[key]))
                    for gate in gates:
                        scores[gate.key].mr.append(gate_score(gate, input_for)[1])
                bar.advance(task)
            for i in range(noise_volumes):
                input_for = _inputs(_noise_volume(grid, i))
                for gate in gates:
                    scores[gate.key].noise.append(gate_score(gate, input_for)[1])
                bar.advance(task)
    results = [_evaluation(m, scores[m.key]) for m in models] + fused
    _compare_sequence(results)
    if out_dir is not None:
        for result in results:
            write_report(result, Path(out_dir) / result.model)
    return results


def _compare_sequence(results: list[Evaluation]) -> None:
    """The sequence classifier's target: at least the slice classifier's AUC."""
    slice_auc = [r.metrics["roc_auc"] for r in results if r.task == "classification"]
    for r in results:
        if r.task == "sequence" and slice_auc:
            r.metrics["target"] = f"ROC AUC >= slice classifier ({slice_auc[0]:.3f})"
            r.metrics["target_met"] = bool(r.metrics["roc_auc"] >= slice_auc[0])
