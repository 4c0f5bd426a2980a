"""Model inference on one series: the infer stage of :mod:`workers.pipeline`.

For each model the registry selects for a series, the series' volume is
preprocessed as the model's manifest asks (cached, so models sharing a spec
share the work), the model runs in batches, and its output becomes result
records: a finding per output (coded concept, probability, present or not)
and, for segmentation models, a segment per output with its mask mapped back
onto the source voxels and measured there. A model with a gate is checked
first by its autoencoder: a reconstruction error above the gate's learned
threshold marks every result of that model on the series as out of
distribution (e.g. an MR series that a CT model's rules let through).

TensorFlow is imported here lazily (the first job of a worker process), never
by the SCP or the CLI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pacsnode.db.results import Code, FindingRecord, ModelIdentity, SegmentRecord
from pacsnode.models.inputspec import PreprocessSpec
from pacsnode.models.manifest import ModelManifest, Output
from pacsnode.models.registry import RegisteredModel, Registry
from pacsnode.workers.preprocess import restore
from pacsnode.workers.volume import Volume

log = logging.getLogger(__name__)

# Produces a model's input: the series' volume preprocessed by this spec.
InputFor = Callable[[PreprocessSpec], np.ndarray]


@dataclass
class ModelResult:
    """What one model found on one series."""

    series_instance_uid: str
    model: ModelIdentity
    findings: list[FindingRecord] = field(default_factory=list)
    segments: list[SegmentRecord] = field(default_factory=list)
    # segment number → boolean mask on the source series' voxel grid (z, y, x)
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    # Seconds in the model's forward passes (and its gate's, when this model
    # ran the gate first): the figure bench/e2e sets against the rest.
    forward_s: float = 0.0
    # Fusion models: (role, SeriesInstanceUID) of every contributing series;
    # empty for single-series models (the result's own series).
    sources: list[tuple[str, str]] = field(default_factory=list)


def identity(model: RegisteredModel) -> ModelIdentity:
    m = model.manifest
    return ModelIdentity(m.name, m.version, m.weights.sha256, m.task)


def _code(output: Output) -> Code:
    c = output.concept
    return Code(c.scheme_designator, c.value, c.meaning)


def load_for_inference(model: RegisteredModel) -> object:
    from pacsnode.models.runtime import load_model

    m = model.manifest
    architecture = m.architecture
    return load_model(
        model.weights_path,
        architecture=architecture.name if architecture else None,
        params=architecture.params if architecture else None,
        sha256=m.weights.sha256,
    )


def gate_score(gate: RegisteredModel, input_for: InputFor) -> tuple[bool, float]:
    """(out of distribution?, reconstruction error) of the gate on this series."""
    from pacsnode.models.runtime import LoadedModel, reconstruction_error

    loaded = load_for_inference(gate)
    assert isinstance(loaded, LoadedModel)
    m = gate.manifest
    error = reconstruction_error(
        loaded, input_for(m.input.preprocess), batch_size=m.input.batch_size
    )
    threshold = m.thresholds.ood_reconstruction_error
    assert threshold is not None  # the manifest requires it for anomaly models
    return error > threshold, error


def run_model(
    model: RegisteredModel,
    volume: Volume,
    input_for: InputFor,
    gate: tuple[bool, float] | None,
) -> ModelResult:
    """Run ``model`` on the series whose source volume is ``volume``."""
    from pacsnode.models import runtime

    m: ModelManifest = model.manifest
    loaded = load_for_inference(model)
    assert isinstance(loaded, runtime.LoadedModel)
    ood, ood_score = gate if gate is not None else (False, None)
    result = ModelResult(volume.series_instance_uid, identity(model))
    spec = m.input.preprocess
    x = input_for(spec)
    batch = m.input.batch_size
    started = time.perf_counter()
    if m.task in ("classification", "sequence"):
        if m.task == "classification":
            probability = float(np.max(runtime.classify_slices(loaded, x, batch_size=batch)))
        else:
            probability = runtime.classify_sequence(loaded, x)
        result.forward_s = time.perf_counter() - started
        for output in m.outputs:
            threshold = output.threshold or m.thresholds.positive
            result.findings.append(
                FindingRecord(_code(output), probability, probability >= threshold, ood, ood_score)
            )
    elif m.task == "segmentation":
        probabilities = runtime.segment_volume(loaded, x, batch_size=batch)
        result.forward_s = time.perf_counter() - started
        lowest = min((o.threshold or m.thresholds.mask) for o in m.outputs) if m.outputs else 0.5
        # Values below the lowest threshold never make a mask voxel: only the
        # neighbourhood of the model's findings is mapped back.
        on_source = restore(probabilities, volume, spec, floor=min(0.01, lowest / 2))
        voxel_mm3 = float(np.prod(volume.spacing))
        for number, output in enumerate(m.outputs, start=1):
            threshold = output.threshold or m.thresholds.mask
            mask = on_source >= threshold
            count = int(mask.sum())
            peak = float(probabilities.max()) if probabilities.size else 0.0
            result.findings.append(FindingRecord(_code(output), peak, count > 0, ood, ood_score))
            if count == 0:
                continue
            nz = np.nonzero(mask)
            lo = [int(a.min()) for a in nz]
            hi = [int(a.max()) + 1 for a in nz]
            result.masks[number] = mask
            result.segments.append(
                SegmentRecord(
                    segment_number=number,
                    code=_code(output),
                    voxel_count=count,
                    volume_mm3=count * voxel_mm3,
                    bbox=(lo[0], lo[1], lo[2], hi[0], hi[1], hi[2]),
                    mean_intensity=float(volume.array[mask].mean()),
                    ood=ood,
                    mask_path="",  # set when the mask is written (persist stage)
                )
            )
    else:
        # Anomaly models run as gates of others; fusion models are study-level.
        return result
    log.info(
        "series %s model %s@%s: %s%s",
        volume.series_instance_uid,
        m.name,
        m.version,
        ", ".join(f"{f.code.meaning} p={f.probability:.3f}" for f in result.findings),
        " (out of distribution)" if ood else "",
    )
    return result


def infer_series(
    registry: Registry,
    models: list[RegisteredModel],
    volume: Volume,
    input_for: InputFor,
) -> list[ModelResult]:
    """Every selected model on one series; each gate runs once."""
    gates: dict[str, tuple[bool, float]] = {}
    results = []
    for model in models:
        if model.manifest.task in ("anomaly", "fusion"):
            continue
        gate = registry.gate_for(model)
        verdict = None
        gate_s = 0.0
        if gate is not None:
            if gate.key not in gates:
                load_for_inference(gate)  # loading is not a forward pass
                started = time.perf_counter()
                gates[gate.key] = gate_score(gate, input_for)
                gate_s = time.perf_counter() - started
            verdict = gates[gate.key]
        result = run_model(model, volume, input_for, verdict)
        result.forward_s += gate_s
        results.append(result)
    return results


def warm_up(registry: Registry) -> int:
    """Load every enabled model and trace it on one input of zeros of its
    manifest's shape, so the first job pays for neither. Returns the number
    of models warmed; a model that fails here is logged and left for its
    job (which reports the failure as it always did)."""
    from pacsnode.models.runtime import LoadedModel

    started = time.monotonic()
    warmed = 0
    for model in registry.enabled:
        m = model.manifest
        try:
            loaded = load_for_inference(model)
            if not isinstance(loaded, LoadedModel):
                continue
            dims = loaded.input_shape[1:]
            # Right-aligned on the manifest's shape and channels; a leading
            # free axis (a sequence model's slices) gets one.
            given = (*m.input.shape, m.input.channels)[-len(dims) :]
            given = (1,) * (len(dims) - len(given)) + given
            shape = tuple(d if d is not None else g for d, g in zip(dims, given, strict=True))
            loaded.predict(np.zeros((1, *shape), dtype=np.float32))
            warmed += 1
        except Exception as exc:  # never stop the worker: the job will say why
            log.warning("warming model %s@%s failed: %s", m.name, m.version, type(exc).__name__)
    log.info(
        "models warm: %d of %d enabled model(s) loaded and traced in %.1f s",
        warmed,
        len(registry.enabled),
        time.monotonic() - started,
    )
    return warmed
