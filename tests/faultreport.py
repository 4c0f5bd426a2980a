"""The fault suite's accounting (``-m faults``): each scenario counts what was
sent, acknowledged, stored, and which jobs, results and exports came out,
then asserts 0 lost and 0 duplicated; the rows are printed as one table at
the end of the session.

Registered as a plugin in ``tests/conftest.py``; tests take the
``fault_report`` fixture and call it once per scenario.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import func, select

from pacsnode.db.models import Export, Finding, Instance, Job, Segment
from pacsnode.db.session import create_db_engine


@dataclass
class FaultRow:
    scenario: str
    sent: int = 0  # instances offered by the senders (including resends)
    acked: int = 0  # distinct instances answered Success
    stored: int = 0  # distinct instances indexed (and on disk)
    jobs: int = 0
    results: int = 0  # findings + segments rows
    exports: int = 0  # export rows sent
    lost: int = 0
    duplicated: int = 0
    seconds: float = 0.0
    # A worker killed: from the kill to its job's next attempt starting.
    resumed_s: float | None = None


_ROWS: list[FaultRow] = []


@dataclass(frozen=True)
class Ledger:
    """What the node's database holds, with duplicates counted."""

    instances: Counter[str]
    jobs_per_study: Counter[int]
    job_states: Counter[str]
    results: int
    result_duplicates: int
    exports_sent: int
    export_duplicates: int

    @property
    def jobs(self) -> int:
        """Initial jobs, over all studies."""
        return sum(self.jobs_per_study.values())

    @property
    def job_duplicates(self) -> int:
        """Initial jobs beyond one per study."""
        return sum(n - 1 for n in self.jobs_per_study.values())


def ledger(database_url: str) -> Ledger:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            instances = Counter(conn.execute(select(Instance.sop_instance_uid)).scalars())
            jobs = conn.execute(select(Job.study_pk, Job.state, Job.kind)).all()
            results = 0
            duplicates = 0
            for key in (
                (Finding.series_pk, Finding.model_name, Finding.code_value),
                (Segment.series_pk, Segment.model_name, Segment.segment_number),
            ):
                grouped = conn.execute(select(*key, func.count()).group_by(*key)).all()
                results += sum(row[-1] for row in grouped)
                duplicates += sum(row[-1] - 1 for row in grouped)
            export_keys = conn.execute(
                select(Export.instance_pk, Export.destination, Export.state)
            ).all()
    finally:
        engine.dispose()
    pairs = Counter((pk, dest) for pk, dest, _ in export_keys)
    return Ledger(
        instances=instances,
        jobs_per_study=Counter(pk for pk, _, kind in jobs if kind == "initial"),
        job_states=Counter(state for _, state, _ in jobs),
        results=results,
        result_duplicates=duplicates,
        exports_sent=sum(1 for *_, state in export_keys if state == "sent"),
        export_duplicates=sum(n - 1 for n in pairs.values()),
    )


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[..., FaultRow]:
    """Record one scenario: ``fault_report(name, sent=..., acked=..., stored=...,
    ...)``; asserts ``lost == duplicated == 0`` after recording, so a failing
    scenario still shows in the table."""
    node_id = request.node.name

    def record(scenario: str, **counts: Any) -> FaultRow:
        row = FaultRow(scenario=f"{scenario} [{node_id.split('[', 1)[-1].rstrip(']')}]"
                       if "[" in node_id else scenario, **counts)  # fmt: skip
        _ROWS.append(row)
        assert row.lost == 0, f"{scenario}: {row.lost} lost"
        assert row.duplicated == 0, f"{scenario}: {row.duplicated} duplicated"
        return row

    return record


def sop_uids(folder: Path) -> set[str]:
    """SOP Instance UIDs of the DICOM files below ``folder``."""
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in folder.rglob("*.dcm")
    }


def lost_and_duplicated(acknowledged: Iterable[str], stored: Counter[str]) -> tuple[int, int]:
    """Acknowledged instances missing from the index, and index entries above one."""
    missing = set(acknowledged) - set(stored)
    return len(missing), sum(n - 1 for n in stored.values() if n > 1)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    names = [f.name for f in fields(FaultRow)]
    table = [[_cell(getattr(r, n)) for n in names] for r in _ROWS]
    widths = [max(len(n), *(len(row[i]) for row in table)) for i, n in enumerate(names)]
    terminalreporter.section("fault scenarios: every instance, job, result and export")
    for cells in [names, *table]:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        terminalreporter.write_line("  ".join(padded))
