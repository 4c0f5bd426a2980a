"""Request (Create) and response (Public) schemas of the API.

Response rows are the query layer's own dataclasses (:mod:`db.queries`,
:mod:`db.admin`), so the API, the CLI's ``--json`` and the dashboard show
the same fields.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

MAX_LIMIT = 1000
# Row ids are 32-bit integers on both databases.
RowId = Annotated[int, Field(ge=1, le=2**31 - 1)]


class PagePublic(BaseModel, Generic[T]):
    """One page of rows and how many match in all."""

    items: list[T]
    total: int
    limit: int
    offset: int


class JobRetryCreate(BaseModel):
    """Which failed jobs to put back to pending (all failed ones when ``ids`` is omitted)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[RowId] | None = Field(default=None, max_length=10_000)


class ExportRetryCreate(BaseModel):
    """Which exports to re-queue: ``failed`` ones by default, or ``retrying`` to try at once."""

    model_config = ConfigDict(extra="forbid")

    ids: list[RowId] | None = Field(default=None, max_length=10_000)
    state: Literal["failed", "retrying"] = "failed"
    destination: str | None = Field(default=None, max_length=64)


class ActionPublic(BaseModel):
    """The outcome of an admin action."""

    action: str
    count: int
    ids: list[int] = []


class ModelPublic(BaseModel):
    name: str
    version: str
    task: str
    enabled: bool
    switched_by: str = ""
    switched_at: datetime | None = None
    description: str = ""


class LatencyPublic(BaseModel):
    stage: str
    model_name: str
    count: int
    p50_s: float
    p95_s: float
    mean_s: float


class StatsPublic(BaseModel):
    studies: int
    series: int
    instances: int
    findings: int
    segments: int
    jobs: dict[str, int]
    exports: dict[str, int]
    associations: int
    instances_last_hour: int
    jobs_finished_last_hour: int
    jobs_finished_last_day: int
    latencies: list[LatencyPublic]


class ReadyPublic(BaseModel):
    database: str
    broker: str
