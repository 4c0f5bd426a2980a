"""What a model wants as input: :class:`PreprocessSpec`, read from its manifest
(``preprocess`` in manifest.yaml) and applied by the workers' preprocessing
(:mod:`pacsnode.workers.preprocess`)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

# Bump when the meaning of a spec changes (order of steps, grid convention,
# filter modes): it is part of every cache key, so stale entries are not reused.
PREPROCESS_VERSION = 1

Normalise = Literal["window", "minmax", "zscore", "percentile", "none"]
Denoise = Literal["none", "mean", "median", "gaussian"]


class PreprocessSpec(BaseModel):
    """How one model wants its input. Axes are (z, y, x), lengths in mm.

    - ``target_spacing``: resample to this voxel size; voxel [0, 0, 0] keeps its
      position and the physical extent is kept (shape = round(n·spacing/target)).
    - ``target_shape``: with ``target_spacing``, crop or pad (with the volume's
      minimum, i.e. background) centred to this shape; without it, resample
      the whole volume to this shape (voxel edges aligned, extent kept).
    - ``window``: (center, width); values are clipped to center ± width/2 and
      scaled to [0, 1]. Requires ``normalise="window"``.
    - ``normalise``: ``minmax`` → [0, 1]; ``percentile`` clips to the 0.5 and
      99.5 percentiles, then → [0, 1]; ``zscore`` → mean 0, std 1 with the
      statistics over all voxels, or only over voxels > ``zscore_threshold``
      when given (e.g. 0 to ignore MR background, -500 HU to ignore air).
    - ``denoise``: ``mean`` / ``median`` use a cube of ``denoise_size`` voxels,
      ``gaussian`` a sigma of ``denoise_sigma`` voxels (of the output grid).
      ``median`` is slow on large volumes (about 5 s for 200x256x256 here).
    - ``interpolation_order``: spline order for resampling (0 nearest,
      1 linear; > 1 prefilters the whole volume in float64 and is slower).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    target_spacing: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = None
    target_shape: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None
    window: tuple[float, PositiveFloat] | None = None
    normalise: Normalise = "none"
    zscore_threshold: float | None = None
    denoise: Denoise = "none"
    denoise_size: int = Field(default=3, ge=1, le=15)
    denoise_sigma: PositiveFloat = 1.0
    interpolation_order: int = Field(default=1, ge=0, le=5)

    @model_validator(mode="after")
    def _check_combinations(self) -> Self:
        if self.normalise == "window" and self.window is None:
            raise ValueError("normalise='window' requires window=(center, width)")
        if self.window is not None and self.normalise != "window":
            raise ValueError(
                f"window is set but normalise={self.normalise!r}; use normalise='window' "
                "or drop window"
            )
        if self.zscore_threshold is not None and self.normalise != "zscore":
            raise ValueError("zscore_threshold is only used with normalise='zscore'")
        return self

    def cache_key(self) -> str:
        """SHA-256 of the canonical JSON of the spec and PREPROCESS_VERSION."""
        payload = {"version": PREPROCESS_VERSION, "spec": self.model_dump(mode="json")}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
