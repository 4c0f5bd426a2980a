"""One CT series from a small spec: the first phantom API, kept for its callers.

Tests of the storage SCP, the assembler and preprocessing use it to make
series of any matrix and slice count quickly. The anatomy is scaled to the
field of view, so even a 16 x 16 series shows a body, organs and a few
lesions; file ``k`` (InstanceNumber k + 1) lies at z = -k · SliceThickness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from pacsnode.lab.phantom.anatomy import build_anatomy
from pacsnode.lab.phantom.dicom import SeriesImage, StudyHeader, series_datasets, uid
from pacsnode.lab.phantom.imaging import ct_hu, lesion_mask
from pacsnode.lab.phantom.lesions import place_lesions
from pacsnode.workers.geometry import Grid

REFERENCE_FOV_MM = 400.0  # the anatomy's adult field of view, scaled to the series
REFERENCE_Z_MM = -60.0  # anatomy level shown at the middle of the series


@dataclass(frozen=True)
class SeriesSpec:
    slices: int = 20
    rows: int = 64
    columns: int = 64
    pixel_spacing: float = 0.7
    slice_thickness: float = 1.25
    seed: int = 0
    patient_id: str = "PHANTOM-0001"
    patient_name: str = "Phantom^Demo"
    accession_number: str = "ACC0001"
    lesions: int = 3


def _grid(spec: SeriesSpec) -> Grid:
    # Ascending grid: voxel [0] is the bottom slice, the last file written.
    origin = (
        -spec.columns * spec.pixel_spacing / 2,
        -spec.rows * spec.pixel_spacing / 2,
        -(spec.slices - 1) * spec.slice_thickness,
    )
    spacing = (spec.slice_thickness, spec.pixel_spacing, spec.pixel_spacing)
    return Grid((spec.slices, spec.rows, spec.columns), spacing, origin)


def _hu_ascending(spec: SeriesSpec) -> np.ndarray:
    grid = _grid(spec)
    rng = np.random.default_rng(spec.seed)
    scale = min(spec.rows, spec.columns) * spec.pixel_spacing / REFERENCE_FOV_MM
    lo, hi = grid.extent()
    centre = (lo + hi) / 2
    offset = (float(centre[0]), float(centre[1]), float(centre[2] - scale * REFERENCE_Z_MM))
    anatomy = build_anatomy(rng, scale=scale, offset=offset)
    diagonal = math.sqrt(sum(s * s for s in grid.spacing))
    lesions = place_lesions(anatomy, grid, spec.lesions, rng, min_diameter=1.05 * diagonal)
    return ct_hu(anatomy.labels(grid), lesion_mask(grid, lesions), lesions, rng)


def ct_phantom_volume(spec: SeriesSpec) -> np.ndarray:
    """The series in HU (float32), in file order: index 0 is the top slice."""
    return _hu_ascending(spec)[::-1].copy()


def ct_series_datasets(spec: SeriesSpec) -> list[Dataset]:
    """One CT Image Storage data set per slice, axial, head first supine."""
    header = StudyHeader(
        study_instance_uid=str(uid(spec.seed, "study")),
        frame_of_reference_uid=str(uid(spec.seed, "frame")),
        patient_id=spec.patient_id,
        patient_name=spec.patient_name,
        accession_number=spec.accession_number,
        study_description="Phantom CT (synthetic, for testing)",
    )
    image = SeriesImage(
        key="CT",
        modality="CT",
        grid=_grid(spec),
        array=_hu_ascending(spec),
        series_number=1,
        description=f"Axial {spec.slice_thickness:g} mm (synthetic phantom)",
        uid_parts=(spec.seed,),
        slice_thickness=spec.slice_thickness,
    )
    return series_datasets(header, image)


def write_ct_series(directory: Path, spec: SeriesSpec) -> list[Path]:
    """Write the series as ``<directory>/CT<nnnn>.dcm``; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(ct_series_datasets(spec)):
        path = directory / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
