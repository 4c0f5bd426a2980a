"""Writing the instance index: idempotent upserts, many instances per transaction.

The storage SCP hands every received instance to :func:`upsert_instances`
through a group-commit writer, so concurrent C-STOREs share one transaction
and one commit. Every statement is an ``INSERT … ON CONFLICT DO UPDATE`` keyed
by the DICOM UID, which makes a re-sent instance (same SOP Instance UID) a
plain update, never a duplicate row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite

from pacsnode.db.models import Instance, Patient, Series, Study


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """What the index keeps of one received instance."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str
    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    frame_of_reference_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax_uid: str
    size_bytes: int
    path: str
    calling_ae_title: str
    peer_host: str
    received_at: datetime


_KEYS: dict[str, tuple[list[str], list[str]]] = {
    # table: (conflict keys, columns refreshed when the row already exists)
    "patient": (
        ["patient_id", "issuer_of_patient_id"],
        ["patient_name", "patient_birth_date", "patient_sex"],
    ),
    "study": (["study_instance_uid"], ["last_received_at"]),
    "series": (["series_instance_uid"], ["last_received_at"]),
}

_TABLES: dict[str, Table] = {
    "patient": Patient.__table__,  # type: ignore[dict-item]
    "study": Study.__table__,  # type: ignore[dict-item]
    "series": Series.__table__,  # type: ignore[dict-item]
    "instance": Instance.__table__,  # type: ignore[dict-item]
}


@cache
def _upsert_statement(dialect: str, table_name: str, columns: tuple[str, ...]) -> Any:
    """Built once per process and table, so SQLAlchemy's compiled cache is hit."""
    table = _TABLES[table_name]
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"unsupported database dialect {dialect}")
    stmt: Any = insert(table)
    if table_name == "instance":
        keys, update = ["sop_instance_uid"], [c for c in columns if c != "sop_instance_uid"]
        return stmt.on_conflict_do_update(
            index_elements=keys, set_={c: stmt.excluded[c] for c in update}
        )
    keys, update = _KEYS[table_name]
    stmt = stmt.on_conflict_do_update(
        index_elements=keys, set_={c: stmt.excluded[c] for c in update}
    )
    return stmt.returning(table.c.id)


def _upsert(conn: Connection, table_name: str, values: dict[str, Any]) -> int:
    stmt = _upsert_statement(conn.dialect.name, table_name, tuple(values))
    return int(conn.execute(stmt, values).scalar_one())


class SeriesCache:
    """Series rows this process wrote recently: their instances skip the
    patient/study/series upserts. ``last_received_at`` of a study or series is
    therefore exact to ``max_age`` seconds."""

    def __init__(self, max_age: float = 5.0) -> None:
        self.max_age = max_age
        self._rows: dict[str, tuple[tuple[int, int], float]] = {}

    def get(self, series_uid: str) -> tuple[int, int] | None:
        """(study pk, series pk) of a recently written series."""
        hit = self._rows.get(series_uid)
        if hit is None or time.monotonic() - hit[1] > self.max_age:
            return None
        return hit[0]

    def put(self, series_uid: str, pks: tuple[int, int]) -> None:
        if len(self._rows) > 10_000:
            self._rows.clear()
        self._rows[series_uid] = (pks, time.monotonic())

    def clear(self) -> None:
        self._rows.clear()


def upsert_instances(
    conn: Connection, records: Sequence[InstanceRecord], cache: SeriesCache | None = None
) -> dict[str, tuple[int, int]]:
    """Index ``records`` in the caller's transaction; return the (study pk,
    series pk) of each Series Instance UID.

    Patients, studies and series shared by several records are written once;
    keys are visited in sorted order so concurrent writers on PostgreSQL lock
    rows in the same order and cannot deadlock.
    """
    patients: dict[tuple[str, str], int] = {}
    studies: dict[str, int] = {}
    series: dict[str, tuple[int, int]] = {}
    ordered = sorted(records, key=lambda r: (r.study_instance_uid, r.series_instance_uid))
    for r in ordered:
        if r.series_instance_uid in series:
            continue
        cached = cache.get(r.series_instance_uid) if cache else None
        if cached is not None:
            series[r.series_instance_uid] = cached
            continue
        pkey = (r.patient_id, r.issuer_of_patient_id)
        if pkey not in patients:
            patients[pkey] = _upsert(
                conn,
                "patient",
                {
                    "patient_id": r.patient_id,
                    "issuer_of_patient_id": r.issuer_of_patient_id,
                    "patient_name": r.patient_name,
                    "patient_birth_date": r.patient_birth_date,
                    "patient_sex": r.patient_sex,
                },
            )
        if r.study_instance_uid not in studies:
            studies[r.study_instance_uid] = _upsert(
                conn,
                "study",
                {
                    "study_instance_uid": r.study_instance_uid,
                    "patient_pk": patients[pkey],
                    "study_date": r.study_date,
                    "study_time": r.study_time,
                    "accession_number": r.accession_number,
                    "study_id": r.study_id,
                    "study_description": r.study_description,
                    "referring_physician_name": r.referring_physician_name,
                    "first_received_at": r.received_at,
                    "last_received_at": r.received_at,
                },
            )
        series[r.series_instance_uid] = (
            studies[r.study_instance_uid],
            _upsert(
                conn,
                "series",
                {
                    "series_instance_uid": r.series_instance_uid,
                    "study_pk": studies[r.study_instance_uid],
                    "modality": r.modality,
                    "series_number": r.series_number,
                    "series_description": r.series_description,
                    "body_part_examined": r.body_part_examined,
                    "frame_of_reference_uid": r.frame_of_reference_uid,
                    "calling_ae_title": r.calling_ae_title,
                    "first_received_at": r.received_at,
                    "last_received_at": r.received_at,
                },
            ),
        )
    # Duplicates inside one batch (a peer re-sending while the first copy is
    # still being committed) would make ON CONFLICT touch a row twice.
    rows = {
        r.sop_instance_uid: {
            "sop_instance_uid": r.sop_instance_uid,
            "series_pk": series[r.series_instance_uid][1],
            "sop_class_uid": r.sop_class_uid,
            "instance_number": r.instance_number,
            "transfer_syntax_uid": r.transfer_syntax_uid,
            "size_bytes": r.size_bytes,
            "path": r.path,
            "calling_ae_title": r.calling_ae_title,
            "peer_host": r.peer_host,
            "received_at": r.received_at,
        }
        for r in records
    }
    params = [rows[uid] for uid in sorted(rows)]
    stmt = _upsert_statement(conn.dialect.name, "instance", tuple(params[0]))
    conn.execute(stmt, params)
    if cache is not None:
        for uid, pks in series.items():
            cache.put(uid, pks)
    return series
