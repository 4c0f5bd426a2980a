"""The one geometry type (workers.geometry.Grid) and highdicom's VolumeGeometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pacsnode.core.errors import GeometryError

from pacsnode.workers.geometry import CORONAL, Grid
from pacsnode.workers.volume import Volume


def _tilted(degrees: float) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return (c, s, 0.0), (0.0, 0.0, -1.0)


@pytest.mark.parametrize("orientation", [CORONAL, _tilted(20.0)])
def test_the_grid_maps_voxels_as_highdicom_does(orientation: tuple) -> None:  # type: ignore[type-arg]
    grid = Grid((5, 6, 7), (2.5, 0.5, 0.75), (10.0, -20.0, 30.0), orientation, "1.2.3")
    geometry = grid.to_highdicom()
    np.testing.assert_allclose(geometry.affine, grid.affine)
    assert geometry.frame_of_reference_uid == "1.2.3"
    indices = np.array([[0, 0, 0], [4, 5, 6], [1, 2, 3]])
    np.testing.assert_allclose(geometry.map_indices_to_reference(indices), grid.to_patient(indices))
    back = Grid.from_highdicom(geometry)
    assert (back.shape, back.frame_of_reference_uid) == (grid.shape, "1.2.3")
    np.testing.assert_allclose(back.spacing, grid.spacing)
    np.testing.assert_allclose(back.origin, grid.origin)
    np.testing.assert_allclose(back.direction, grid.direction, atol=1e-12)


def test_a_left_handed_highdicom_volume_is_refused() -> None:
    geometry = Grid((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)).to_highdicom()
    with pytest.raises(GeometryError, match="left-handed"):
        Grid.from_highdicom(geometry.flip_spatial(0))


def test_a_volume_converts_to_a_highdicom_volume_naming_its_series_on_failure() -> None:
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    volume = Volume(array, Grid((3, 4, 5), (2.0, 1.0, 1.0), (1.0, 2.0, 3.0)), "1.2.9", "CT",
                    ("a", "b", "c"), "HU")  # fmt: skip
    converted = volume.to_highdicom()
    np.testing.assert_array_equal(converted.array, array)
    np.testing.assert_allclose(converted.affine, volume.grid.affine)
    # Orthogonal within the loader's tolerance (1e-3), not highdicom's (1e-4).
    skewed = Grid((3, 4, 5), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1.0, 0.0, 0.0), (5e-4, 1.0, 0.0)))
    with pytest.raises(GeometryError, match=r"series 1\.2\.9"):
        Volume(array, skewed, "1.2.9", "CT", ("a", "b", "c"), "HU").to_highdicom()
    with pytest.raises(ValueError, match="not the grid's"):
        Volume(array, Grid((3, 4, 6), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), "1.2.9", "CT", (), "")
