"""Co-registration by DICOM geometry: several series of a study on one grid.

Series that share a Frame of Reference UID (PS3.3 C.7.4.1.1.1) share one
patient coordinate system, so their voxels relate through the Image Plane
attributes alone (ImagePositionPatient, ImageOrientationPatient, PixelSpacing
and the slice positions, PS3.3 C.7.6.2.1.1): no image-based registration is
needed. Series with different Frames of Reference need a Spatial Registration
object (PS3.3 C.20), which pacsnode does not apply yet, so they are refused
with a clear error instead of being overlaid by accident.

The resampling itself is :func:`scipy.ndimage.affine_transform`: one affine
map from the target grid's voxel indices to the source's, composed of the
two grids' index → patient affines (:attr:`workers.geometry.Grid.affine`,
highdicom's convention).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage  # type: ignore[import-untyped]  # no scipy-stubs in dev deps

from pacsnode.core.errors import CoregistrationError
from pacsnode.workers.geometry import Grid
from pacsnode.workers.volume import Volume


def check_same_frame(volumes: list[Volume]) -> str:
    """The shared Frame of Reference UID, or a :class:`CoregistrationError`."""
    frames = {v.frame_of_reference_uid for v in volumes}
    if "" in frames:
        missing = [v.series_instance_uid for v in volumes if not v.frame_of_reference_uid]
        raise CoregistrationError(
            f"series {', '.join(missing)} has no Frame of Reference UID (0020,0052): "
            "its position cannot be related to the other series"
        )
    if len(frames) > 1:
        detail = ", ".join(
            f"{v.series_instance_uid} in {v.frame_of_reference_uid}" for v in volumes
        )
        raise CoregistrationError(
            f"series lie in different Frames of Reference ({detail}) and no spatial "
            "registration relates them: they cannot be fused"
        )
    return frames.pop()


def resample_onto(
    volume: Volume, grid: Grid, *, order: int = 1, fill: float | None = None
) -> Volume:
    """``volume`` resampled onto ``grid`` (same Frame of Reference required).

    Voxels of ``grid`` outside the source series get ``fill`` (default: the
    source's minimum, i.e. its background). The result carries the grid's
    geometry and the source's identity (series UID, modality, units).
    """
    if not volume.frame_of_reference_uid or (
        volume.frame_of_reference_uid != grid.frame_of_reference_uid
    ):
        raise CoregistrationError(
            f"series {volume.series_instance_uid} lies in Frame of Reference "
            f"{volume.frame_of_reference_uid or '(none)'}, the reference grid in "
            f"{grid.frame_of_reference_uid}: no spatial registration relates them, "
            "so they cannot be fused"
        )
    # target index -> patient -> source index
    mapping = np.linalg.solve(volume.grid.affine, grid.affine)
    if not np.all(np.isfinite(mapping)):
        raise CoregistrationError(f"series {volume.series_instance_uid}: degenerate geometry")
    background = float(volume.array.min()) if fill is None else fill
    array = ndimage.affine_transform(
        volume.array,
        mapping[:3, :3],
        offset=mapping[:3, 3],
        output_shape=grid.shape,
        order=order,
        mode="constant",
        cval=background,
        prefilter=order > 1,
        output=np.float32,
    )
    if not _overlaps(volume, mapping, grid.shape):
        raise CoregistrationError(
            f"series {volume.series_instance_uid} does not overlap the reference grid"
        )
    return Volume(
        array=array,
        grid=grid,
        series_instance_uid=volume.series_instance_uid,
        modality=volume.modality,
        sop_instance_uids=(),
        units=volume.units,
    )


def _overlaps(volume: Volume, mapping: np.ndarray, shape: tuple[int, int, int]) -> bool:
    """Whether any corner-bounded part of the target grid falls in the source."""
    corners = np.array(
        [[z, y, x, 1.0] for z in (0, shape[0] - 1) for y in (0, shape[1] - 1)
         for x in (0, shape[2] - 1)]
    )  # fmt: skip
    mapped = (mapping @ corners.T).T[:, :3]
    lo, hi = mapped.min(axis=0), mapped.max(axis=0)
    size = np.asarray(volume.array.shape) - 1
    return bool(np.all(hi >= -0.5) and np.all(lo <= size + 0.5))
