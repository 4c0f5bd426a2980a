"""``pacsnode evaluate`` for fusion models: four variants side by side.

Held-out phantom CT+PT studies (seeds from
:data:`models.fusion_recipe.FUSION_HELD_OUT_SEED`, never used in training or
validation), run as the node runs a study: the model from the registry,
the roles stacked by :func:`workers.fusion.stack_roles` with the manifest's
specs, slices through :func:`workers.fusion.predict_slices` in inference
mode. From the same forward passes come the study ROC AUC of the CT-only
head, the PT-only head, the decision-level combination (the manifest's
``decision_weights``) and the feature-level fused head.

Target: the best fused AUC is at least the best single-modality
AUC + 0.05. Synthetic data; the model is for demonstration, not clinical use.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.progress import Progress
from rich.table import Table

from pacsnode.lab import fusion_recipe as recipe
from pacsnode.lab import recipe_data as data
from pacsnode.lab.evaluation import Evaluation, binary_metrics
from pacsnode.lab.phantom import generate_study
from pacsnode.models.registry import RegisteredModel
from pacsnode.workers.fusion import predict_slices, role_specs, stack_roles, weights_of

FUSION_MARGIN = 0.05
VARIANTS = {
    "ct": "CT only",
    "pt": "PT only",
    "decision": "decision-level",
    "feature": "feature-level",
}
FOV_MM = 384.0
Z_EXTENT_MM = 400.0


def held_out_scale(model: RegisteredModel) -> recipe.FusionScale:
    """Phantoms with the CT on the model's grid over 384 x 384 x 400 mm."""
    spacing = model.manifest.input.preprocess.target_spacing
    slice_mm, pixel_mm = (spacing[0], spacing[1]) if spacing else (8.0, 4.0)
    size = max(16, round(FOV_MM / pixel_mm))
    return recipe.FusionScale(
        pixel_mm=pixel_mm, slice_mm=slice_mm, size=size,
        slices=max(4, round(Z_EXTENT_MM / slice_mm)), pt_size=max(8, size // 2),
    )  # fmt: skip


def evaluate_fusion(model: RegisteredModel, studies: int, *, progress: bool = True) -> Evaluation:
    """The four variants' metrics on ``studies`` held-out CT+PT phantoms."""
    from pacsnode.models.architectures import spatial_multiple
    from pacsnode.workers.infer import load_for_inference

    m = model.manifest
    assert m.fusion is not None and m.architecture is not None
    loaded = load_for_inference(model)
    multiple = spatial_multiple(m.architecture.name, m.architecture.params)
    scale = held_out_scale(model)
    specs, roles = role_specs(m), m.fusion.roles
    cases, probabilities = [], []
    seconds = 0.0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"held-out CT+PT ({m.name})", total=studies)
        for i in range(studies):
            seed = recipe.FUSION_HELD_OUT_SEED + i
            study = generate_study(recipe.study_spec(scale, seed, recipe.lesion_schedule(seed)))
            labels = recipe.avid_slices(study)
            volumes = dict(
                zip(roles, (data.volume_of(study.series[k]) for k in ("CT", "PT")), strict=True)
            )
            started = time.perf_counter()
            stack, _ = stack_roles(volumes, roles, m.fusion.reference_role, specs)
            probabilities.append(predict_slices(loaded, stack, multiple, m.input.batch_size))
            seconds += time.perf_counter() - started
            cases.append(recipe.FusionCase(seed, np.empty(0), labels, bool(labels.any())))
            bar.advance(task)
    scores = recipe.variant_scores(cases, probabilities, weights_of(m))
    return _evaluation(model, scores, seconds / max(1, studies))


def _evaluation(
    model: RegisteredModel, scores: recipe.VariantScores, seconds_per_study: float
) -> Evaluation:
    m = model.manifest
    assert m.fusion is not None
    aucs = scores.aucs()
    reported = np.asarray(scores.feature if m.fusion.method == "feature" else scores.decision)
    best_single = max(aucs["ct"], aucs["pt"])
    best_fused = max(aucs["decision"], aucs["feature"])
    metrics: dict[str, Any] = {
        **binary_metrics(scores.labels, reported, threshold=m.thresholds.positive),
        "n": len(scores.labels),
        "positives": int(np.sum(scores.labels)),
        "roc_auc": aucs["feature" if m.fusion.method == "feature" else "decision"],
        **{f"roc_auc_{k}": v for k, v in aucs.items()},
        "decision_weights": dict(m.fusion.decision_weights),
        "best_single_auc": best_single,
        "best_fused_auc": best_fused,
        "fusion_gain": best_fused - best_single,
        "seconds_per_study": round(seconds_per_study, 3),
        "target": f"best fused ROC AUC >= best single-modality ROC AUC + {FUSION_MARGIN}",
        "target_met": bool(best_fused >= best_single + FUSION_MARGIN),
    }
    return Evaluation(m.name, m.task, metrics, scores.labels, reported)


def fusion_table(results: Sequence[Evaluation]) -> Table | None:
    """ROC AUC of the four variants of each fusion model, or None."""
    fused = [r for r in results if r.task == "fusion"]
    if not fused:
        return None
    table = Table(title="Fusion models: held-out CT+PT phantoms, study ROC AUC")
    for column in ("Model", "N", *VARIANTS.values(), "Gain", "Target met"):
        table.add_column(column, justify="left" if column == "Model" else "right")
    for r in fused:
        metrics = r.metrics
        table.add_row(
            r.model,
            str(metrics["n"]),
            *(f"{metrics[f'roc_auc_{k}']:.3f}" for k in VARIANTS),
            f"{metrics['fusion_gain']:+.3f}",
            "yes" if metrics["target_met"] else "NO",
        )
    return table
