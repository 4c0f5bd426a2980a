"""The study detail's key image: a slice of the stored series with the
segmentation mask painted over it, as PNG.

The slice is the one where the study's largest segment covers most pixels,
read with the pipeline's own series loader (so mask and image share the
voxel grid, in the same slice order) from the spooled instances, and the
mask from the ``.npz`` the persist stage wrote. Without a segment it is the
middle slice of the study's first volume series.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import Engine, select

from pacsnode.core.settings import Settings
from pacsnode.db.models import Instance, Segment, Series, Study

VOLUME_MODALITIES = ("CT", "MR", "PT")


def _series_paths(engine: Engine, settings: Settings, series_pk: int) -> list[Path]:
    with engine.connect() as conn:
        paths = conn.execute(
            select(Instance.path).where(Instance.series_pk == series_pk).order_by(Instance.id)
        ).scalars()
        return [settings.spool_dir / p for p in paths]


def key_image(engine: Engine, settings: Settings, study_instance_uid: str) -> bytes | None:
    """PNG bytes, or None when the study has no volume series."""
    from pacsnode.workers.volume import load_series  # numpy/pydicom decoding: only when asked

    with engine.connect() as conn:
        segment = conn.execute(
            select(Segment)
            .join(Study, Study.id == Segment.study_pk)
            .where(Study.study_instance_uid == study_instance_uid, Segment.mask_path != "")
            .order_by(Segment.voxel_count.desc(), Segment.id)
            .limit(1)
        ).first()
        series_pk = (
            segment.series_pk
            if segment is not None
            else conn.execute(
                select(Series.id)
                .join(Study, Study.id == Series.study_pk)
                .where(
                    Study.study_instance_uid == study_instance_uid,
                    Series.modality.in_(VOLUME_MODALITIES),
                )
                .order_by(Series.id)
                .limit(1)
            ).scalar_one_or_none()
        )
    if series_pk is None:
        return None
    volume = load_series(_series_paths(engine, settings, series_pk))
    array = np.asarray(volume.array)
    mask = None
    if segment is not None:
        with np.load(settings.layout.results / segment.mask_path) as data:
            key = f"segment_{segment.segment_number}"
            if key in data and data[key].shape == array.shape:
                mask = data[key].astype(bool)
    z = int(np.argmax(mask.sum(axis=(1, 2)))) if mask is not None else array.shape[0] // 2
    return _png(array[z], None if mask is None else mask[z])


def _png(image: np.ndarray, mask: np.ndarray | None) -> bytes:
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if mask is not None:
        red = np.array([255.0, 40.0, 40.0])
        rgb[mask] = 0.45 * rgb[mask] + 0.55 * red
    out = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(out, format="PNG")
    return out.getvalue()
