"""QIDO-RS (PS3.18 §10.6): search for studies, series and instances.

The query parameters become the same ``{keyword: values}`` a C-FIND
identifier does, and :mod:`db.qr` matches them: one matcher for DIMSE and
DICOMweb (PS3.4 C.2.2.2: universal, single value, wildcard, UID list, date
and time ranges; PN case-insensitive). An attribute is named by keyword
(``PatientID``) or tag (``00100020``). Differences from C-FIND that PS3.18
asks for:

- UID lists may be separated by commas as well as backslashes;
- ``/series`` and ``/instances`` need no Study Instance UID (the unique keys
  above the level match like other keys);
- ``includefield`` (repeated or comma-separated, or ``all``) adds returned
  attributes to the level's defaults; ``limit``/``offset`` page through the
  matches (at most ``dicomweb.max_results`` per answer; a ``Warning`` header
  says when more remain);
- ``fuzzymatching=true`` is accepted and answered with a ``Warning`` header:
  matching stays literal;
- a key pacsnode does not index is ignored for matching, with a ``Warning``;
  an unknown name, a bad value, a sequence path → 400 with the reason.

No match: 204 No Content (PS3.18 §8.3.4.4.1).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pacsnode.api.deps import EngineDep, ReadDep, SettingsDep
from pacsnode.api.dicomweb.common import (
    DICOM_JSON,
    base_url,
    instance_url,
    record,
    series_url,
    study_url,
)
from pacsnode.api.dicomweb.dicomjson import dataset_json
from pacsnode.core.errors import InvalidQuery
from pacsnode.db.qr import KEYS, InformationModel, Kind, Level, find, find_query

router = APIRouter(tags=["dicomweb"])

# PS3.18 Table 10.6.3-3/4/5, as far as the index holds them.
DEFAULT_FIELDS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: (
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
    ),
    Level.IMAGE: ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "AvailableTransferSyntaxUID"),
}
CONTROL_PARAMETERS = ("includefield", "fuzzymatching", "limit", "offset")
_LEVEL_NAMES = {Level.STUDY: "STUDY", Level.SERIES: "SERIES", Level.IMAGE: "IMAGE"}


def _keyword(name: str) -> str:
    """A query parameter's attribute keyword; InvalidQuery if unknown."""
    if "." in name:
        raise InvalidQuery(f"{name}: sequence matching is not supported", None)
    text = name.strip()
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        keyword = keyword_for_tag(int(text, 16))
        if keyword:
            return str(keyword)
    elif tag_for_keyword(text) is not None:
        return text
    raise InvalidQuery(f"{name!r} is not a DICOM attribute keyword or tag", None)


def _values(keyword: str, value: str) -> tuple[str, ...]:
    key = KEYS.get(keyword)
    if key is not None and key.kind is Kind.UID:  # PS3.18 §8.3.4.1: UID lists by comma
        value = value.replace(",", "\\")
    parts = value.split("\\")
    return tuple(p.strip() for p in parts if p.strip())


def _int(name: str, value: str) -> int:
    if not value.isdigit() or len(value) > 9:
        raise InvalidQuery(f"{name} must be a non-negative integer", None)
    return int(value)


def parse(
    request: Request, level: Level, fixed: dict[str, str]
) -> tuple[dict[str, tuple[str, ...]], list[str], int | None, int, list[str]]:
    """(keys, include, limit, offset, warnings) of a QIDO-RS request."""
    keys: dict[str, tuple[str, ...]] = {}
    include: list[str] = list(DEFAULT_FIELDS[level])
    limit: int | None = None
    offset = 0
    warnings: list[str] = []
    for name, value in request.query_params.multi_items():
        lower = name.lower()
        if lower == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if item.lower() == "all":
                    include.extend(k for k, key in KEYS.items() if key.level <= level)
                elif item:
                    include.append(_keyword(item))
        elif lower == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise InvalidQuery("fuzzymatching must be true or false", None)
            if value.lower() == "true":
                warnings.append(
                    "The fuzzymatching parameter is not supported. "
                    "Only literal matching has been performed."
                )
        elif lower == "limit":
            limit = _int("limit", value)
        elif lower == "offset":
            offset = _int("offset", value)
        else:
            keyword = _keyword(name)
            if keyword in fixed:
                raise InvalidQuery(f"{keyword} is given by the path", keyword)
            keys[keyword] = _values(keyword, value)
    for keyword, value in fixed.items():
        keys[keyword] = (value,)
    unsupported = [k for k, v in keys.items() if v and (k not in KEYS or KEYS[k].level > level)]
    if unsupported:
        warnings.append(
            "The following attributes are not supported for matching and were ignored: "
            + ", ".join(unsupported)
        )
    return keys, include, limit, offset, warnings


def _match_json(row: dict[str, Any], returned: tuple[str, ...], url: str) -> dict[str, Any]:
    ds = Dataset()
    for keyword in returned:
        value = row.get(keyword)
        if keyword == "ModalitiesInStudy":
            value = list(value or [])
        ds.add_new(Tag(keyword), dictionary_VR(keyword), value)
    ds.RetrieveURL = url
    return dataset_json(ds)


def search(
    request: Request,
    settings: SettingsDep,
    engine: EngineDep,
    level: Level,
    fixed: dict[str, str],
) -> Response:
    keys, include, limit, offset, warnings = parse(request, level, fixed)
    requested = dict(keys)
    for keyword in include:
        requested.setdefault(keyword, ())
    requested = {k: v for k, v in requested.items() if k in KEYS and KEYS[k].level <= level}
    hierarchical = level is not Level.STUDY and "StudyInstanceUID" in fixed
    if level is Level.IMAGE and "SeriesInstanceUID" not in fixed:
        hierarchical = False
    query = find_query(
        InformationModel.STUDY_ROOT, _LEVEL_NAMES[level], requested, hierarchical=hierarchical
    )
    cap = settings.dicomweb.max_results
    if limit is not None and limit > cap:
        warnings.append(f"The limit was reduced to {cap}, this node's maximum.")
    page = min(limit if limit is not None else cap, cap)
    rows = find(engine, query, limit=page + 1, offset=offset)
    if len(rows) > page:
        rows = rows[:page]
        warnings.append(
            f"There are more matches than returned: use offset={offset + page} for the next page."
        )
    base = base_url(request)
    body = []
    for row in rows:
        study = row.get("StudyInstanceUID", "")
        if level is Level.STUDY:
            url = study_url(base, study)
        elif level is Level.SERIES:
            url = series_url(base, study, row["SeriesInstanceUID"])
        else:
            url = instance_url(base, study, row["SeriesInstanceUID"], row["SOPInstanceUID"])
        body.append(_match_json(row, query.returned, url))
    headers = {"Warning": ", ".join(f'299 pacsnode "{w}"' for w in warnings)} if warnings else {}
    if not body:
        return Response(status_code=204, headers=headers)
    return JSONResponse(body, media_type=DICOM_JSON, headers=headers)


def _search(level: Level, fixed_names: tuple[str, ...]) -> Any:
    def endpoint(
        request: Request, principal: ReadDep, settings: SettingsDep, engine: EngineDep
    ) -> Response:
        fixed = {
            name: request.path_params[param]
            for name, param in zip(fixed_names, ("study", "series"), strict=False)
        }
        response = search(request, settings, engine, level, fixed)
        record(
            engine,
            principal,
            request,
            "dicomweb.search",
            fixed.get("StudyInstanceUID", ""),
            level=_LEVEL_NAMES[level],
            status=response.status_code,
        )
        return response

    return endpoint


for path, level, fixed in (
    ("/studies", Level.STUDY, ()),
    ("/series", Level.SERIES, ()),
    ("/instances", Level.IMAGE, ()),
    ("/studies/{study}/series", Level.SERIES, ("StudyInstanceUID",)),
    ("/studies/{study}/instances", Level.IMAGE, ("StudyInstanceUID",)),
    (
        "/studies/{study}/series/{series}/instances",
        Level.IMAGE,
        ("StudyInstanceUID", "SeriesInstanceUID"),
    ),
):
    router.add_api_route(
        path,
        _search(level, fixed),
        methods=["GET"],
        summary=f"QIDO-RS: search for {level.name.lower()} entities",
        response_class=Response,
    )
