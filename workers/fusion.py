"""Study-level fusion: the fuse stage of :mod:`workers.pipeline`.

A fusion model (``task: fusion``) names the series it needs by role
(``fusion.inputs``: e.g. one CT and one PT). For each such model the stage

1. picks one series per role among the study's volume series (the one with
   the most slices, then the lowest SeriesInstanceUID; a series fills one
   role only);
2. when a role has no series yet, records a ``waiting`` outcome bounded by
   ``fusion.max_wait_s`` after the study's first instance (db.fusion): a late
   series starts an update job that runs the model again, and the
   assembler's loop records ``incomplete`` once the deadline passes;
3. otherwise co-registers the roles onto the reference role's model grid by
   DICOM geometry (workers.coregister), stacks them as channels, runs the
   model slice by slice and takes each head's maximum over the slices;
4. writes a finding that lies on the reference series and names every
   contributing series (db.results ``sources``; the SR references them all).

Series in different Frames of Reference give a ``failed`` outcome and fail
the job with the reason, after the other models' results are written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from pacsnode.core.states import FusionState
from pacsnode.db.fusion import Outcome
from pacsnode.db.results import Code, FindingRecord
from pacsnode.models.inputspec import PreprocessSpec
from pacsnode.models.manifest import ModelManifest, SeriesInfo
from pacsnode.models.registry import RegisteredModel
from pacsnode.workers.coregister import check_same_frame, resample_onto
from pacsnode.workers.geometry import Grid
from pacsnode.workers.infer import ModelResult, identity
from pacsnode.workers.preprocess import output_geometry, preprocess
from pacsnode.workers.volume import Volume

log = logging.getLogger(__name__)

# Heads of models.architectures.build_fusion_classifier, in output order.
HEADS = ("ct", "pt", "fused")
_EPS = 1e-6


@dataclass(frozen=True)
class Candidate:
    """A volume series of the study as role selection sees it."""

    series_instance_uid: str
    series_pk: int
    info: SeriesInfo


def choose_series(
    manifest: ModelManifest, candidates: Sequence[Candidate]
) -> tuple[dict[str, Candidate], list[str]]:
    """One series per role, and the roles nothing matched."""
    assert manifest.fusion is not None
    chosen: dict[str, Candidate] = {}
    taken: set[str] = set()
    ordered = sorted(candidates, key=lambda c: (-(c.info.slices or 0), c.series_instance_uid))
    for role, rules in manifest.fusion.inputs.items():
        for candidate in ordered:
            if candidate.series_instance_uid not in taken and rules.matches(candidate.info):
                chosen[role] = candidate
                taken.add(candidate.series_instance_uid)
                break
    missing = [role for role in manifest.fusion.inputs if role not in chosen]
    return chosen, missing


def stack_roles(
    volumes: Mapping[str, Volume],
    roles: Sequence[str],
    reference: str,
    specs: Mapping[str, PreprocessSpec],
) -> tuple[np.ndarray, Grid]:
    """The roles' volumes on the reference role's model grid as one
    ``(z, y, x, len(roles))`` float32 stack, with that grid's geometry.

    The reference is preprocessed by its spec (which resamples it to the
    model's spacing); every other role is resampled onto the same grid by
    DICOM geometry, then given its own intensity steps.
    """
    check_same_frame([volumes[r] for r in roles])
    base = volumes[reference]
    grid = output_geometry(base, specs[reference])
    channels = []
    for role in roles:
        if role == reference:
            channels.append(preprocess(base, specs[role]))
        else:
            channels.append(preprocess(resample_onto(volumes[role], grid), specs[role]))
    return np.stack(channels, axis=-1), grid


def role_specs(manifest: ModelManifest) -> dict[str, PreprocessSpec]:
    assert manifest.fusion is not None
    reference = manifest.fusion.reference_role
    return {
        role: manifest.input.preprocess if role == reference else manifest.fusion.preprocess[role]
        for role in manifest.fusion.roles
    }


def decision_scores(head_probabilities: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Decision-level fusion of per-slice probabilities ``(n, roles)``: the
    weighted sum of the roles' log-odds, as a probability per slice."""
    p = np.clip(np.asarray(head_probabilities, np.float64), _EPS, 1 - _EPS)
    logits = np.log(p) - np.log1p(-p)
    combined = logits @ np.asarray(weights, np.float64)
    return np.asarray(1 / (1 + np.exp(-combined)))


@dataclass(frozen=True)
class StudyScores:
    """Study probabilities of each head and of the decision-level fusion."""

    ct: float
    pt: float
    feature: float
    decision: float


def study_scores(slice_probabilities: np.ndarray, weights: Sequence[float]) -> StudyScores:
    """Per-slice ``(n, 3)`` head outputs → study scores (maximum over slices:
    a study is as suspicious as its most suspicious slice)."""
    p = np.asarray(slice_probabilities, np.float64)
    decision = decision_scores(p[:, :2], weights)
    return StudyScores(
        float(p[:, 0].max()), float(p[:, 1].max()), float(p[:, 2].max()), float(decision.max())
    )


def predict_slices(model: object, stack: np.ndarray, multiple: int, batch_size: int) -> np.ndarray:
    """The model's ``(n, 3)`` outputs for the slices of a ``(z, y, x, c)``
    stack, padded to ``multiple`` in-plane with 0 (background after
    normalisation)."""
    from pacsnode.models.runtime import LoadedModel

    assert isinstance(model, LoadedModel)
    _, y, x, _ = stack.shape
    pad_y, pad_x = (-y) % multiple, (-x) % multiple
    if pad_y or pad_x:
        stack = np.pad(stack, ((0, 0), (0, pad_y), (0, pad_x), (0, 0)))
    return np.asarray(model.predict(stack, batch_size=batch_size), np.float64)


def weights_of(manifest: ModelManifest) -> list[float]:
    assert manifest.fusion is not None
    return [float(manifest.fusion.decision_weights.get(r, 0.0)) for r in manifest.fusion.roles]


def run_fusion(
    model: RegisteredModel,
    chosen: Mapping[str, Candidate],
    volume_of: Callable[[str], Volume],
    load: Callable[[RegisteredModel], object],
) -> tuple[ModelResult, StudyScores]:
    """Run one fusion model on its chosen series; raises CoregistrationError
    (a PacsnodeError) when the series cannot share a grid."""
    from pacsnode.models.architectures import spatial_multiple

    m = model.manifest
    assert m.fusion is not None and m.architecture is not None
    roles, reference = m.fusion.roles, m.fusion.reference_role
    volumes = {role: volume_of(chosen[role].series_instance_uid) for role in roles}
    stack, _ = stack_roles(volumes, roles, reference, role_specs(m))
    started = time.perf_counter()
    loaded = load(model)
    multiple = spatial_multiple(m.architecture.name, m.architecture.params)
    probabilities = predict_slices(loaded, stack, multiple, m.input.batch_size)
    forward = time.perf_counter() - started
    scores = study_scores(probabilities, weights_of(m))
    probability = scores.feature if m.fusion.method == "feature" else scores.decision
    findings = []
    for output in m.outputs:
        c = output.concept
        threshold = output.threshold or m.thresholds.positive
        findings.append(
            FindingRecord(
                Code(c.scheme_designator, c.value, c.meaning),
                probability,
                probability >= threshold,
                ood=False,
                ood_score=None,
            )
        )
    result = ModelResult(
        chosen[reference].series_instance_uid,
        identity(model),
        findings,
        forward_s=forward,
        sources=[(role, chosen[role].series_instance_uid) for role in roles],
    )
    return result, scores


def missing_outcome(
    missing: Sequence[str],
    chosen: Mapping[str, Candidate],
    first_received: datetime,
    max_wait_s: float,
    now: datetime,
) -> Outcome:
    """``waiting`` until ``max_wait_s`` after the study's first instance,
    then ``incomplete``."""
    series = {r: c.series_instance_uid for r, c in chosen.items()}
    until = first_received + timedelta(seconds=max_wait_s)
    if now >= until:
        detail = f"incomplete study: no series for role(s) {', '.join(missing)}"
        return Outcome(FusionState.INCOMPLETE, missing, series, detail, until)
    return Outcome(
        FusionState.WAITING, missing, series, f"waiting for role(s) {', '.join(missing)}", until
    )
