"""Errors of the preprocessing stage (series → volume → model input).

They live here for now, deriving from the one root :class:`PacsnodeError`, so
the Celery retry policy can treat them like every other pacsnode error: all of
them are permanent for the given input (re-running the task on the same files
gives the same error), so they must never be retried. The owner of
``pacsnode.errors`` may move them there later.

Messages name the series by its SeriesInstanceUID and instances by their SOP
Instance UID, never by patient name or ID (docs/architecture.md §3, privacy), so they can be
logged and stored in job rows as they are.
"""

from __future__ import annotations

from pacsnode.core.errors import PacsnodeError


class PreprocessError(PacsnodeError):
    """A series could not be turned into a model input."""


class GeometryError(PreprocessError):
    """The instances do not form one regular, decodable 3-D volume.

    Raised for mixed series, inconsistent orientation, spacing or matrix size,
    missing geometry attributes, duplicate or missing slices, sheared stacks
    (gantry tilt) and undecodable pixel data.
    """


class PixelDataError(GeometryError):
    """A slice's pixel data cannot be decoded (names the SOP Instance UID and
    transfer syntax).

    Not a geometry problem in the strict sense, but it has the same consequence
    (the series cannot become a volume), so it subclasses :class:`GeometryError`
    and callers that catch that class catch this too.
    """


class CoregistrationError(PreprocessError):
    """Two series cannot share one grid: different Frames of Reference
    (PS3.3 C.7.4.1) and no registration between them, or no overlap."""
