"""Solid shapes in patient space (mm) and their rasterisation onto a grid.

A shape answers two questions: its patient-space bounding box, and whether
points lie inside it. Points arrive as broadcastable coordinate arrays (from
:meth:`Grid.coordinates`), so testing a shape costs one vectorised pass over
its bounding box only, never over the whole volume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from pacsnode.workers.geometry import Grid

Bounds = tuple[np.ndarray, np.ndarray]


class Shape(ABC):
    """Base class: combine with ``&`` (intersection) and ``-`` (difference)."""

    @abstractmethod
    def bounds(self) -> Bounds:
        """Patient-space box (lo, hi) that holds the shape; may be infinite."""

    @abstractmethod
    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Inside-test on broadcastable coordinate arrays."""

    def __and__(self, other: Shape) -> Shape:
        return Intersection(self, other)

    def __sub__(self, other: Shape) -> Shape:
        return Difference(self, other)


@dataclass(frozen=True, eq=False)
class Ellipsoid(Shape):
    """An ellipsoid; ``rotation`` columns are its axes in patient space."""

    centre: np.ndarray  # (x, y, z)
    semi_axes: np.ndarray  # along the rotation's columns
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    def bounds(self) -> Bounds:
        half = np.sqrt((self.rotation**2) @ (np.asarray(self.semi_axes) ** 2))
        return self.centre - half, self.centre + half

    def radius2(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Squared normalised radius: 1 on the surface, < 1 inside."""
        dx, dy, dz = (np.float32(c) for c in self.centre)
        d = (x - dx, y - dy, z - dz)
        total: np.ndarray | None = None
        for axis in range(3):
            r = self.rotation[:, axis]
            u = sum(
                (d[a] * np.float32(r[a]) for a in range(3) if abs(r[a]) > 1e-12),
                start=np.float32(0.0),
            )
            term = np.square(u / np.float32(self.semi_axes[axis]))
            total = term if total is None else total + term
        assert total is not None
        return np.asarray(total)

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.radius2(x, y, z) <= 1.0


@dataclass(frozen=True, eq=False)
class EllipticCylinder(Shape):
    """A cylinder along z, between ``z_range``, whose elliptic cross-section
    (semi-axes ``a`` along x and ``b`` along y) may vary with z: linear
    interpolation between ``(z, a, b)`` knots, shrunk by ``inset`` mm."""

    centre_xy: tuple[float, float]
    knots: np.ndarray  # rows (z, a, b), z ascending
    z_range: tuple[float, float]
    inset: float = 0.0

    def semi_axes(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        zk, ak, bk = self.knots.T
        a = np.interp(z, zk, ak).astype(np.float32) - np.float32(self.inset)
        b = np.interp(z, zk, bk).astype(np.float32) - np.float32(self.inset)
        return np.maximum(a, np.float32(1e-3)), np.maximum(b, np.float32(1e-3))

    def bounds(self) -> Bounds:
        a, b = float(self.knots[:, 1].max()), float(self.knots[:, 2].max())
        cx, cy = self.centre_xy
        z0, z1 = self.z_range
        return np.array([cx - a, cy - b, z0]), np.array([cx + a, cy + b, z1])

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        a, b = self.semi_axes(z)
        cx, cy = (np.float32(c) for c in self.centre_xy)
        inside = np.square((x - cx) / a) + np.square((y - cy) / b) <= 1.0
        z0, z1 = self.z_range
        return np.asarray(inside & (z >= z0) & (z <= z1))


@dataclass(frozen=True, eq=False)
class Cylinder(Shape):
    """A circular cylinder along z."""

    centre_xy: tuple[float, float]
    radius: float
    z_range: tuple[float, float]

    def bounds(self) -> Bounds:
        (cx, cy), r, (z0, z1) = self.centre_xy, self.radius, self.z_range
        return np.array([cx - r, cy - r, z0]), np.array([cx + r, cy + r, z1])

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        cx, cy = (np.float32(c) for c in self.centre_xy)
        inside = np.square(x - cx) + np.square(y - cy) <= np.float32(self.radius**2)
        z0, z1 = self.z_range
        return np.asarray(inside & (z >= z0) & (z <= z1))


@dataclass(frozen=True, eq=False)
class Slab(Shape):
    """Half-spaces by coordinate: ``lo <= x, y, z <= hi`` (use ±inf to leave open)."""

    lo: np.ndarray
    hi: np.ndarray

    def bounds(self) -> Bounds:
        return np.asarray(self.lo, dtype=np.float64), np.asarray(self.hi, dtype=np.float64)

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        inside = np.asarray(True)
        for c, lo, hi in zip((x, y, z), self.lo, self.hi, strict=True):
            if np.isfinite(lo):
                inside = inside & (c >= lo)
            if np.isfinite(hi):
                inside = inside & (c <= hi)
        return inside


@dataclass(frozen=True, eq=False)
class Bands(Shape):
    """Periodic bands along z: ``(z - phase) mod period < width`` (ribs, vertebrae)."""

    period: float
    width: float
    phase: float = 0.0

    def bounds(self) -> Bounds:
        return np.full(3, -np.inf), np.full(3, np.inf)

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.asarray(np.mod(z - np.float32(self.phase), np.float32(self.period)) < self.width)


@dataclass(frozen=True, eq=False)
class Intersection(Shape):
    a: Shape
    b: Shape

    def bounds(self) -> Bounds:
        (lo1, hi1), (lo2, hi2) = self.a.bounds(), self.b.bounds()
        return np.maximum(lo1, lo2), np.minimum(hi1, hi2)

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.asarray(self.a.contains(x, y, z) & self.b.contains(x, y, z))


@dataclass(frozen=True, eq=False)
class Difference(Shape):
    a: Shape
    b: Shape

    def bounds(self) -> Bounds:
        return self.a.bounds()

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.asarray(self.a.contains(x, y, z) & ~self.b.contains(x, y, z))


def paint(labels: np.ndarray, grid: Grid, shape: Shape, value: int) -> None:
    """Set ``labels`` to ``value`` inside ``shape`` (later shapes win)."""
    lo, hi = shape.bounds()
    lo_grid, hi_grid = grid.extent()
    box = grid.box(np.maximum(lo, lo_grid - 1e3), np.minimum(hi, hi_grid + 1e3))
    if box is None:
        return
    x, y, z = grid.coordinates(box)
    inside = np.broadcast_to(shape.contains(x, y, z), labels[box].shape)
    np.copyto(labels[box], np.uint8(value), where=inside)


def contains_points(shape: Shape, points: np.ndarray) -> np.ndarray:
    """Inside-test for an (n, 3) array of patient points."""
    x, y, z = (points[:, a].astype(np.float32) for a in range(3))
    return np.broadcast_to(shape.contains(x, y, z), (len(points),)).copy()
