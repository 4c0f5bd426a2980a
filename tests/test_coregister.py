"""Co-registration by DICOM geometry (workers.coregister, workers.fusion.stack_roles).

Two series of one Frame of Reference are written as real DICOM files on
different grids (spacing, size, position, orientation), each with a bright
marker at the same patient position; after resampling the moving series
onto the reference grid the marker's centre lands on the reference's marker
voxel within half a voxel.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pacsnode.core.errors import CoregistrationError
from pacsnode.lab.phantom import Grid, SeriesImage, StudyHeader, series_datasets
from pacsnode.models.inputspec import PreprocessSpec
from pacsnode.workers.coregister import check_same_frame, resample_onto
from pacsnode.workers.fusion import stack_roles
from pacsnode.workers.volume import Volume, load_series

MARKER_MM = (23.0, -41.0, 17.0)  # patient (x, y, z)


def header(frame: str) -> StudyHeader:
    return StudyHeader(
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        frame_of_reference_uid=frame,
        patient_id="COREG",
        patient_name="Coreg^Test",
        accession_number="A1",
        study_description="co-registration test",
    )


def marker_image(key: str, modality: str, grid: Grid, radius_mm: float) -> SeriesImage:
    """Background 100, a ball of 1000 around MARKER_MM."""
    k, j, i = np.indices(grid.shape).reshape(3, -1).astype(np.float64)
    points = grid.to_patient(np.stack([k, j, i], axis=1))
    inside = np.linalg.norm(points - np.asarray(MARKER_MM), axis=1) <= radius_mm
    array = np.where(inside, 1000.0, 100.0).reshape(grid.shape).astype(np.float32)
    thickness = grid.spacing[0]
    return SeriesImage(key, modality, grid, array, 1, key, ("coreg", key), thickness)


def write_series(folder: Path, frame: str, image: SeriesImage) -> Volume:
    folder.mkdir(parents=True)
    paths = []
    for n, ds in enumerate(series_datasets(header(frame), image), start=1):
        path = folder / f"{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return load_series(paths)


def expected_index(volume: Volume) -> np.ndarray:
    """(z, y, x) index of MARKER_MM on the volume's grid, from its geometry."""
    offset = np.asarray(MARKER_MM) - np.asarray(volume.origin)
    x, y, z = volume.direction @ offset  # along row, column, normal
    return np.array([z, y, x]) / np.asarray(volume.spacing)


def centre(array: np.ndarray) -> np.ndarray:
    return np.asarray(ndimage.center_of_mass(np.clip(array - 100.0, 0, None)))


def rotated(degrees: float) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    a = math.radians(degrees)
    return ((math.cos(a), math.sin(a), 0.0), (-math.sin(a), math.cos(a), 0.0))


CASES = {
    # reference CT-like grid vs a coarser, shifted PT-like grid
    "offset_and_spacing": (
        Grid.centred((40, 64, 64), (3.0, 2.0, 2.0), (5.0, -10.0, 12.0)),
        Grid.centred((20, 24, 24), (5.0, 6.5, 6.5), (-12.0, 8.0, 30.0)),
    ),
    # the moving series is also rotated in-plane (ImageOrientationPatient)
    "rotated_orientation": (
        Grid.centred((40, 64, 64), (3.0, 2.0, 2.0), (0.0, 0.0, 10.0)),
        Grid.centred((24, 32, 32), (4.0, 5.0, 5.0), (10.0, -5.0, 20.0), rotated(20.0)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_marker_lands_on_the_same_voxel(tmp_path: Path, case: str) -> None:
    reference_grid, moving_grid = CASES[case]
    frame = "1.2.826.0.1.3680043.8.498.2"
    reference = write_series(
        tmp_path / "ref", frame, marker_image("REF", "CT", reference_grid, 7.0)
    )
    moving = write_series(tmp_path / "mov", frame, marker_image("MOV", "PT", moving_grid, 10.0))
    # the written geometry is what the test assumes
    assert np.allclose(centre(reference.array - 0), expected_index(reference), atol=0.5)
    resampled = resample_onto(moving, reference.grid)
    assert resampled.array.shape == reference.array.shape
    assert resampled.frame_of_reference_uid == frame
    found = centre(resampled.array)
    assert np.all(np.abs(found - expected_index(reference)) <= 0.5), (
        found,
        expected_index(reference),
    )
    # the moving series alone puts its marker elsewhere in index space
    assert not np.allclose(centre(moving.array), expected_index(reference), atol=0.5)


def test_stack_roles_puts_the_roles_on_the_model_grid(tmp_path: Path) -> None:
    reference_grid, moving_grid = CASES["offset_and_spacing"]
    frame = "1.2.826.0.1.3680043.8.498.3"
    ct = write_series(tmp_path / "ct", frame, marker_image("CT", "CT", reference_grid, 7.0))
    pt = write_series(tmp_path / "pt", frame, marker_image("PT", "PT", moving_grid, 10.0))
    specs = {
        "ct": PreprocessSpec(target_spacing=(6.0, 4.0, 4.0), normalise="minmax"),
        "pt": PreprocessSpec(normalise="minmax"),
    }
    stack, geometry = stack_roles({"ct": ct, "pt": pt}, ("ct", "pt"), "ct", specs)
    assert stack.shape == (*geometry.shape, 2) and stack.dtype == np.float32
    ct_centre = np.asarray(ndimage.center_of_mass(stack[..., 0] > 0.5))
    pt_centre = np.asarray(ndimage.center_of_mass(stack[..., 1] > 0.5))
    assert np.all(np.abs(ct_centre - pt_centre) <= 0.5), (ct_centre, pt_centre)


def test_different_frames_of_reference_are_refused(tmp_path: Path) -> None:
    reference_grid, moving_grid = CASES["offset_and_spacing"]
    ct = write_series(
        tmp_path / "ct", "1.2.826.0.1.3680043.8.498.4",
        marker_image("CT", "CT", reference_grid, 7.0),
    )  # fmt: skip
    pt = write_series(
        tmp_path / "pt", "1.2.826.0.1.3680043.8.498.5",
        marker_image("PT", "PT", moving_grid, 10.0),
    )  # fmt: skip
    with pytest.raises(CoregistrationError, match="different Frames of Reference"):
        check_same_frame([ct, pt])
    with pytest.raises(CoregistrationError, match="no spatial registration"):
        resample_onto(pt, ct.grid)
    specs = {"ct": PreprocessSpec(), "pt": PreprocessSpec()}
    with pytest.raises(CoregistrationError, match=pt.series_instance_uid):
        stack_roles({"ct": ct, "pt": pt}, ("ct", "pt"), "ct", specs)


def test_no_overlap_is_refused(tmp_path: Path) -> None:
    frame = "1.2.826.0.1.3680043.8.498.6"
    reference_grid = Grid.centred((10, 16, 16), (3.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    far = Grid.centred((10, 16, 16), (3.0, 2.0, 2.0), (0.0, 0.0, 500.0))
    ct = write_series(tmp_path / "ct", frame, marker_image("CT", "CT", reference_grid, 3.0))
    pt = write_series(tmp_path / "pt", frame, marker_image("PT", "PT", far, 3.0))
    with pytest.raises(CoregistrationError, match="does not overlap"):
        resample_onto(pt, ct.grid)
