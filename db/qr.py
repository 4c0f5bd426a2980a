"""Query/retrieve matching on the index (PS3.4 C.2.2.2, C.4.1, C.4.2, C.6).

Pure query building and reading: no DICOM decoding and no network. A request
arrives as (information model, Query/Retrieve Level, ``{keyword: values}``),
where ``values`` is the key's value split at backslashes, ``()`` for an empty
key (universal matching). :func:`find_query` and :func:`retrieve_query` check
it against the hierarchical rules and return a :class:`Query`;
:func:`find` and :func:`instances` turn that into one SQL statement each.

Matching, per kind of key (:class:`Kind`), follows PS3.4 C.2.2.2:

- universal: an empty value, or one made of ``*`` only, matches everything;
- single value: equality, case-sensitive, except PN (below);
- wildcard (``*`` any run, ``?`` one character) for text keys (AE, CS, SH,
  LO, PN): PostgreSQL ``LIKE`` (``ILIKE`` for PN) with ``%``, ``_`` and the
  escape character escaped, so they match only themselves; on SQLite
  ``GLOB``, because SQLite's ``LIKE`` ignores case, with ``[`` escaped as
  ``[[]``. Patterns are bound parameters, never SQL text;
- list of UIDs (backslash separated) for UI keys: ``IN``;
- range for DA and TM keys: ``A-B``, ``A-`` and ``-B``, bounds included. An
  upper bound with less precision than the stored value covers all of it
  (``-1030`` includes ``103059``); an empty stored value never lies in a range;
- a backslash-separated value of any other key matches if any of its values
  matches (ModalitiesInStudy ``CT\\MR``; lenient for the other keys).

PN is matched case-insensitively, the implementation choice PS3.4 C.2.2.2.1
allows: SQL ``lower()`` on both sides (on SQLite only ASCII letters fold).
A study whose Required Key is empty is not treated as matching every value
(PS3.4 C.2.2.1.1): the index stores unknown values as empty strings, and
matching them against a search by accession number would be a surprise.

Only hierarchical (baseline) queries are supported: the unique key of the
level above the query level must be present with a single value; unique keys
further up are optional, but single-valued when present. Relational queries
are refused with :class:`InvalidQuery`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    Select,
    and_,
    exists,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import aliased

from pacsnode.core.errors import IndexQueryError, InvalidQuery
from pacsnode.db.models import Instance, Patient, Series, Study


class Level(IntEnum):
    """Query/Retrieve levels, top down (PS3.4 C.6)."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class InformationModel(Enum):
    """The two Query/Retrieve information models pacsnode serves (PS3.4 C.6.1, C.6.2)."""

    PATIENT_ROOT = "patient root"
    STUDY_ROOT = "study root"

    @property
    def levels(self) -> tuple[Level, ...]:
        if self is InformationModel.PATIENT_ROOT:
            return (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
        # Study Root: the patient's attributes are attributes of the study.
        return (Level.STUDY, Level.SERIES, Level.IMAGE)


class Kind(Enum):
    """How a key is matched (see the module docstring)."""

    UID = "UI"
    TEXT = "text"  # AE, CS, SH, LO: case-sensitive
    PN = "PN"  # case-insensitive
    DATE = "DA"
    TIME = "TM"
    NUMBER = "IS"
    MODALITIES = "ModalitiesInStudy"  # any series of the study
    COUNT = "count"  # return only: Number of ... Related ...


@dataclass(frozen=True)
class Key:
    keyword: str
    level: Level
    kind: Kind
    column: Any  # the SQL expression of the value; None for ModalitiesInStudy


# Subqueries use their own aliases, correlated explicitly to the outer entity,
# so that the outer query's tables (joined for the levels above) never leak in.
def _count_studies_of_patient() -> Any:
    st = aliased(Study)
    return select(func.count(st.id)).where(st.patient_pk == Patient.id).correlate(Patient)


def _count_series_of_patient() -> Any:
    st, se = aliased(Study), aliased(Series)
    return (
        select(func.count(se.id))
        .join(st, se.study_pk == st.id)
        .where(st.patient_pk == Patient.id)
        .correlate(Patient)
    )


def _count_instances_of_patient() -> Any:
    st, se, im = aliased(Study), aliased(Series), aliased(Instance)
    return (
        select(func.count(im.id))
        .join(se, im.series_pk == se.id)
        .join(st, se.study_pk == st.id)
        .where(st.patient_pk == Patient.id)
        .correlate(Patient)
    )


def _count_series_of_study() -> Any:
    se = aliased(Series)
    return select(func.count(se.id)).where(se.study_pk == Study.id).correlate(Study)


def _count_instances_of_study() -> Any:
    se, im = aliased(Series), aliased(Instance)
    return (
        select(func.count(im.id))
        .join(se, im.series_pk == se.id)
        .where(se.study_pk == Study.id)
        .correlate(Study)
    )


def _count_instances_of_series() -> Any:
    im = aliased(Instance)
    return select(func.count(im.id)).where(im.series_pk == Series.id).correlate(Series)


def _keys() -> dict[str, Key]:
    P, ST, SE, IM = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE
    table = [
        Key("PatientID", P, Kind.TEXT, Patient.patient_id),
        Key("IssuerOfPatientID", P, Kind.TEXT, Patient.issuer_of_patient_id),
        Key("PatientName", P, Kind.PN, Patient.patient_name),
        Key("PatientBirthDate", P, Kind.DATE, Patient.patient_birth_date),
        Key("PatientSex", P, Kind.TEXT, Patient.patient_sex),
        Key("NumberOfPatientRelatedStudies", P, Kind.COUNT, _count_studies_of_patient()),
        Key("NumberOfPatientRelatedSeries", P, Kind.COUNT, _count_series_of_patient()),
        Key("NumberOfPatientRelatedInstances", P, Kind.COUNT, _count_instances_of_patient()),
        Key("StudyInstanceUID", ST, Kind.UID, Study.study_instance_uid),
        Key("StudyDate", ST, Kind.DATE, Study.study_date),
        Key("StudyTime", ST, Kind.TIME, Study.study_time),
        Key("AccessionNumber", ST, Kind.TEXT, Study.accession_number),
        Key("StudyID", ST, Kind.TEXT, Study.study_id),
        Key("StudyDescription", ST, Kind.TEXT, Study.study_description),
        Key("ReferringPhysicianName", ST, Kind.PN, Study.referring_physician_name),
        Key("ModalitiesInStudy", ST, Kind.MODALITIES, None),
        Key("NumberOfStudyRelatedSeries", ST, Kind.COUNT, _count_series_of_study()),
        Key("NumberOfStudyRelatedInstances", ST, Kind.COUNT, _count_instances_of_study()),
        Key("SeriesInstanceUID", SE, Kind.UID, Series.series_instance_uid),
        Key("Modality", SE, Kind.TEXT, Series.modality),
        Key("SeriesNumber", SE, Kind.NUMBER, Series.series_number),
        Key("SeriesDescription", SE, Kind.TEXT, Series.series_description),
        Key("BodyPartExamined", SE, Kind.TEXT, Series.body_part_examined),
        Key("FrameOfReferenceUID", SE, Kind.UID, Series.frame_of_reference_uid),
        Key("NumberOfSeriesRelatedInstances", SE, Kind.COUNT, _count_instances_of_series()),
        Key("SOPInstanceUID", IM, Kind.UID, Instance.sop_instance_uid),
        Key("SOPClassUID", IM, Kind.UID, Instance.sop_class_uid),
        Key("InstanceNumber", IM, Kind.NUMBER, Instance.instance_number),
        Key("AvailableTransferSyntaxUID", IM, Kind.UID, Instance.transfer_syntax_uid),
    ]
    return {key.keyword: key for key in table}


KEYS: dict[str, Key] = _keys()
UNIQUE_KEY: dict[Level, str] = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
_ENTITY: dict[Level, Any] = {
    Level.PATIENT: Patient,
    Level.STUDY: Study,
    Level.SERIES: Series,
    Level.IMAGE: Instance,
}
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_INTEGER = re.compile(r"^[+-]?\d{1,12}$")
_WILDCARDS = frozenset("*?")


@dataclass(frozen=True)
class Query:
    """A checked request.

    ``matching`` holds the supported keys that restrict the result, with
    their values; ``returned`` the supported keys each response carries (the
    requested ones and the unique keys of the query level and those above);
    ``unsupported`` the requested keywords the index cannot answer (returned
    empty); ``ignored`` those of them, and of the return-only keys, whose
    value the request wanted matched (C-FIND then answers Pending with the
    warning 0xFF01).
    """

    model: InformationModel
    level: Level
    matching: Mapping[str, tuple[str, ...]]
    returned: tuple[str, ...] = ()
    unsupported: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()


def parse_level(model: InformationModel, value: str | None) -> Level:
    if not value:
        raise InvalidQuery("QueryRetrieveLevel is missing or empty", "QueryRetrieveLevel")
    level = Level.__members__.get(value.strip().upper())  # CS; lenient about case
    if level is None or level not in model.levels:
        names = "/".join(lvl.name for lvl in model.levels)
        raise InvalidQuery(f"QueryRetrieveLevel must be {names}", "QueryRetrieveLevel")
    return level


def _is_universal(values: Sequence[str]) -> bool:
    return not values or any(set(value) <= {"*"} for value in values)


def _check_values(key: Key, values: tuple[str, ...]) -> None:
    """Refuse a value its key cannot be matched with."""
    for value in values:
        if key.kind is Kind.UID and (_WILDCARDS & set(value) or len(value) > 64):
            raise InvalidQuery(f"{key.keyword}: UIDs match by value or list only", key.keyword)
        if key.kind in (Kind.DATE, Kind.TIME):
            pattern = _DATE if key.kind is Kind.DATE else _TIME
            bounds = value.split("-", 1) if "-" in value else [value]
            if not any(bounds) or not all(not b or pattern.match(b) for b in bounds):
                raise InvalidQuery(
                    f"{key.keyword}: not a {key.kind.value} value or range", key.keyword
                )
        if key.kind is Kind.NUMBER and not _INTEGER.match(value):
            raise InvalidQuery(f"{key.keyword}: not an integer", key.keyword)


def _check_above(
    model: InformationModel, level: Level, keys: Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, ...]]:
    """The unique keys of the levels above ``level``: the parent's is
    required, all must be single values (hierarchical query, PS3.4 C.4.1.2.2)."""
    above = [lvl for lvl in model.levels if lvl < level]
    found: dict[str, tuple[str, ...]] = {}
    for lvl in above:
        keyword = UNIQUE_KEY[lvl]
        values = tuple(keys.get(keyword, ()))
        if _is_universal(values):
            if lvl == above[-1]:
                raise InvalidQuery(
                    f"{keyword} needed at {level.name} level (hierarchical query)", keyword
                )
            continue
        if len(values) != 1 or _WILDCARDS & set(values[0]):
            raise InvalidQuery(
                f"{keyword} must be a single value above {level.name} level", keyword
            )
        _check_values(KEYS[keyword], values)
        found[keyword] = values
    return found


def find_query(
    model: InformationModel,
    level_value: str | None,
    keys: Mapping[str, Sequence[str]],
    *,
    hierarchical: bool = True,
) -> Query:
    """Check a C-FIND identifier (PS3.4 C.4.1.2.2) and plan its matching.

    Without ``hierarchical`` (QIDO-RS ``/series`` and ``/instances``, PS3.18
    10.6.1) the unique keys of the levels above are optional and match like
    any other key (a UID list included)."""
    level = parse_level(model, level_value)
    matching = _check_above(model, level, keys) if hierarchical else {}
    returned: list[str] = []
    unsupported: list[str] = []
    ignored: list[str] = []
    for keyword, raw in keys.items():
        values = tuple(raw)
        key = KEYS.get(keyword)
        if key is None or key.level > level:
            unsupported.append(keyword)
            if not _is_universal(values):
                ignored.append(keyword)
            continue
        returned.append(keyword)
        if keyword in matching or _is_universal(values):
            continue
        if key.kind is Kind.COUNT:
            ignored.append(keyword)
            continue
        _check_values(key, values)
        matching[keyword] = values
    for lvl in model.levels:
        if lvl <= level and UNIQUE_KEY[lvl] not in returned:
            returned.append(UNIQUE_KEY[lvl])
    order = list(KEYS)
    return Query(
        model,
        level,
        matching,
        tuple(sorted(returned, key=order.index)),
        tuple(unsupported),
        tuple(ignored),
    )


def retrieve_query(
    model: InformationModel, level_value: str | None, keys: Mapping[str, Sequence[str]]
) -> Query:
    """Check a C-MOVE/C-GET identifier (PS3.4 C.4.2.2.1): the level's unique
    key with one value (PATIENT) or a list of UIDs, and the unique keys of the
    levels above as single values when present. Other keys are ignored."""
    level = parse_level(model, level_value)
    keyword = UNIQUE_KEY[level]
    values = tuple(keys.get(keyword, ()))
    if _is_universal(values) or any(_WILDCARDS & set(v) for v in values):
        raise InvalidQuery(f"{keyword} must hold the value(s) to retrieve", keyword)
    if level is Level.PATIENT and len(values) != 1:
        raise InvalidQuery("PatientID must be a single value", keyword)
    _check_values(KEYS[keyword], values)
    above = [lvl for lvl in model.levels if lvl < level]
    matching: dict[str, tuple[str, ...]] = {}
    for lvl in above:
        upper = UNIQUE_KEY[lvl]
        upper_values = tuple(keys.get(upper, ()))
        if _is_universal(upper_values):
            continue
        if len(upper_values) != 1 or _WILDCARDS & set(upper_values[0]):
            raise InvalidQuery(f"{upper} must be a single value above {level.name} level", upper)
        _check_values(KEYS[upper], upper_values)
        matching[upper] = upper_values
    matching[keyword] = values
    return Query(model, level, matching)


# -- SQL ------------------------------------------------------------------------------


def _escape_like(value: str) -> str:
    out = []
    for ch in value:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _escape_glob(value: str) -> str:
    # In GLOB only *, ? and [ are special; * and ? are wanted as wildcards.
    return value.replace("[", "[[]")


def _wildcard(column: Any, value: str, *, ignore_case: bool, dialect: str) -> ColumnElement[bool]:
    if dialect == "sqlite" and not ignore_case:
        return column.op("GLOB", is_comparison=True)(_escape_glob(value))
    pattern = _escape_like(value)
    if ignore_case:
        return column.ilike(pattern, escape="\\")
    return column.like(pattern, escape="\\")


def _text(column: Any, value: str, *, ignore_case: bool, dialect: str) -> ColumnElement[bool]:
    if _WILDCARDS & set(value):
        return _wildcard(column, value, ignore_case=ignore_case, dialect=dialect)
    if ignore_case:
        return func.lower(column) == func.lower(literal(value))
    return column == value


def _range(column: Any, value: str) -> ColumnElement[bool]:
    if "-" not in value:
        return column == value
    low, high = value.split("-", 1)
    conditions = [column != ""]
    if low:
        conditions.append(column >= low)
    if high:
        # A stored value more precise than the bound: 103059 is within -1030.
        conditions.append(or_(column <= high, func.substr(column, 1, len(high)) == high))
    return and_(*conditions)


def _condition(key: Key, values: tuple[str, ...], dialect: str) -> ColumnElement[bool]:
    if key.kind is Kind.UID:
        return key.column.in_(values)
    if key.kind is Kind.MODALITIES:
        series = aliased(Series)
        modality = or_(
            *(_text(series.modality, v, ignore_case=False, dialect=dialect) for v in values)
        )
        return exists().where(series.study_pk == Study.id, modality).correlate(Study)
    alternatives: list[ColumnElement[bool]] = []
    for value in values:
        if key.kind in (Kind.DATE, Kind.TIME):
            alternatives.append(_range(key.column, value))
        elif key.kind is Kind.NUMBER:
            alternatives.append(key.column == int(value))
        else:
            alternatives.append(
                _text(key.column, value, ignore_case=key.kind is Kind.PN, dialect=dialect)
            )
    return or_(*alternatives)


def _base(level: Level, *columns: Any) -> Select[Any]:
    """The level's entity joined to every level above it."""
    stmt = select(*columns).select_from(_ENTITY[level])
    if level >= Level.IMAGE:
        stmt = stmt.join(Series, Instance.series_pk == Series.id)
    if level >= Level.SERIES:
        stmt = stmt.join(Study, Series.study_pk == Study.id)
    if level >= Level.STUDY:
        stmt = stmt.join(Patient, Study.patient_pk == Patient.id)
    return stmt


def _where(stmt: Select[Any], query: Query, dialect: str) -> Select[Any]:
    for keyword, values in query.matching.items():
        stmt = stmt.where(_condition(KEYS[keyword], values, dialect))
    return stmt


_ORDER: dict[Level, tuple[Any, ...]] = {
    Level.PATIENT: (Patient.patient_id, Patient.id),
    Level.STUDY: (Study.study_date, Study.study_time, Study.id),
    Level.SERIES: (Series.series_number.is_(None), Series.series_number, Series.id),
    Level.IMAGE: (Instance.instance_number.is_(None), Instance.instance_number, Instance.id),
}


def select_matches(query: Query, dialect: str) -> Select[Any]:
    """One row per matching entity: ``_pk`` and a column per returned key."""
    entity = _ENTITY[query.level]
    columns = [entity.id.label("_pk")]
    for keyword in query.returned:
        key = KEYS[keyword]
        if key.kind is Kind.COUNT:
            columns.append(key.column.scalar_subquery().label(keyword))
        elif key.column is not None:
            columns.append(key.column.label(keyword))
    stmt = _where(_base(query.level, *columns), query, dialect)
    return stmt.order_by(*_ORDER[query.level])


def select_instances(query: Query, dialect: str) -> Select[Any]:
    """The instances a C-MOVE/C-GET sends, in study, series, instance order."""
    stmt = _base(
        Level.IMAGE,
        Instance.sop_instance_uid,
        Instance.sop_class_uid,
        Instance.transfer_syntax_uid,
        Instance.path,
        Study.study_instance_uid,
        Series.series_instance_uid,
    )
    stmt = _where(stmt, query, dialect)
    return stmt.order_by(Study.id, *_ORDER[Level.SERIES], *_ORDER[Level.IMAGE])


@dataclass(frozen=True, slots=True)
class StoredInstance:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str  # relative to the spool directory
    study_instance_uid: str
    series_instance_uid: str


_IN_CHUNK = 500


def find(
    engine: Engine, query: Query, *, limit: int | None = None, offset: int = 0
) -> list[dict[str, Any]]:
    """The C-FIND matches, each a ``{keyword: value}`` of the returned keys;
    ``limit`` and ``offset`` page through them (QIDO-RS).

    Read in one short transaction before anything is sent, so no database
    connection stays open while the peer reads the responses."""
    stmt = select_matches(query, engine.dialect.name)
    if limit is not None:
        stmt = stmt.limit(limit)
    if offset:
        stmt = stmt.offset(offset)
    try:
        with engine.connect() as conn:
            rows = [dict(row) for row in conn.execute(stmt).mappings()]
            if "ModalitiesInStudy" in query.returned:
                modalities = _modalities(conn, [row["_pk"] for row in rows])
                for row in rows:
                    row["ModalitiesInStudy"] = modalities.get(row["_pk"], [])
    except SQLAlchemyError as exc:
        # Never the exception text: it holds the statement's parameters.
        raise IndexQueryError(f"the index cannot be read ({type(exc).__name__})") from None
    return rows


def _modalities(conn: Any, study_pks: list[int]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for start in range(0, len(study_pks), _IN_CHUNK):
        chunk = study_pks[start : start + _IN_CHUNK]
        result = conn.execute(
            select(Series.study_pk, Series.modality)
            .where(Series.study_pk.in_(chunk), Series.modality != "")
            .distinct()
            .order_by(Series.study_pk, Series.modality)
        )
        for study_pk, modality in result:
            found.setdefault(study_pk, []).append(modality)
    return found


def instances(engine: Engine, query: Query) -> list[StoredInstance]:
    """The instances a retrieve request names."""
    try:
        with engine.connect() as conn:
            result = conn.execute(select_instances(query, engine.dialect.name))
            return [StoredInstance(*row) for row in result]
    except SQLAlchemyError as exc:
        raise IndexQueryError(f"the index cannot be read ({type(exc).__name__})") from None
