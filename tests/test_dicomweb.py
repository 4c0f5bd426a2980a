"""The DICOMweb server (PS3.18) of a real ``pacsnode serve`` over HTTP, with
dicomweb-client (Python), Orthanc's DICOMweb client and raw requests: QIDO-RS, WADO-RS,
STOW-RS, auth.

One node serves the module: a small phantom study (CT 10, PT 8, MR 3 + 3
slices, 64² CT) sent by C-STORE with storescu; no models run. Every
instance retrieved by WADO-RS is compared, element for element, with the
file sent. STOW-RS stores other studies beside it (a phantom study, pydicom's
test files in every transfer syntax the node accepts over DIMSE, hostile
bodies), and getscu retrieves the same study as WADO-RS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacsnode.db.session import create_db_engine
from pacsnode.db.tokens import create_token
from pacsnode.lab.phantom import StudySpec, WrittenStudy, write_study
from tests.support import IN_CI, Node, node_config, require_binary, storescu

SPEC = StudySpec(seed=21, size=64, slices=10)
SERIES_SIZES = {"CT": 10, "PT": 8, "MR_T1": 3, "MR_T2": 3}


@dataclass
class DW:
    node: Node
    url: str
    tokens: dict[str, str]
    study: WrittenStudy
    study_uid: str
    patient_id: str
    work: Path

    def client(self, role: str = "read") -> DICOMwebClient:
        return DICOMwebClient(
            url=self.url, headers={"Authorization": f"Bearer {self.tokens[role]}"}
        )

    def get(self, path: str, role: str | None = "read", **kwargs: object) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})  # type: ignore[call-overload]
        if role:
            headers["Authorization"] = f"Bearer {self.tokens[role]}"
        return requests.get(self.url + path, headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]


def make_tokens(database_url: str) -> dict[str, str]:
    engine = create_db_engine(database_url)
    tokens = {}
    with engine.begin() as conn:
        for role in ("read", "store", "admin"):
            tokens[role] = create_token(conn, role, f"dicomweb-{role}")[1]
    engine.dispose()
    return tokens


@pytest.fixture(scope="module")
def dw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DW]:
    work = tmp_path_factory.mktemp("dicomweb")
    database_url = f"sqlite:///{work / 'index.db'}"
    study = write_study(work / "study", SPEC)
    empty_models = work / "no-models"
    empty_models.mkdir()
    node = Node(
        data_dir=work / "node",
        database_url=database_url,
        config=node_config(
            peers=[{"ae_title": ae, "hosts": ["127.0.0.1"]} for ae in ("STORESCU", "GETSCU")],
            models_dir=str(empty_models),
            dicomweb={
                "max_request_mb": 64,
                "max_part_mb": 16,
                "cors_origins": ["http://viewer.example"],
            },
        ),
    )
    try:
        node.start()
        for key in SERIES_SIZES:
            storescu(node, study.folder / key)
        header = pydicom.dcmread(study.series["CT"][0], stop_before_pixels=True)
        yield DW(
            node,
            f"{node.api_url}/dicom-web",
            make_tokens(database_url),
            study,
            str(header.StudyInstanceUID),
            str(header.PatientID),
            work,
        )
    finally:
        node.stop()


def sent_files(dw: DW) -> dict[str, Path]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for paths in dw.study.series.values()
        for p in paths
    }


def uid_of(item: dict, tag: str) -> str:  # type: ignore[type-arg]
    return str(item[tag]["Value"][0])


def multipart_parts(response: requests.Response) -> list[bytes]:
    """The part bodies of a multipart/related response (RFC 2046)."""
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    chunks = response.content.split(b"--" + boundary.encode())[1:-1]
    return [c.split(b"\r\n\r\n", 1)[1][: -len(b"\r\n")] for c in chunks]


def same_elements(received: Dataset, sent: Dataset) -> None:
    """Element for element (values compared as decoded by pydicom)."""
    assert [e.tag for e in received] == [e.tag for e in sent]
    for element in sent:
        assert received[element.tag].value == element.value, element.keyword


# -- QIDO-RS ---------------------------------------------------------------------------


def test_search_every_level(dw: DW) -> None:
    client = dw.client()
    studies = client.search_for_studies()
    assert [uid_of(s, "0020000D") for s in studies] == [dw.study_uid]
    study = studies[0]
    assert study["00100020"]["Value"] == [dw.patient_id]
    assert study["00201208"]["Value"] == [sum(SERIES_SIZES.values())]
    assert sorted(study["00080061"]["Value"]) == ["CT", "MR", "PT"]
    assert study["00081190"]["Value"] == [f"{dw.url}/studies/{dw.study_uid}"]

    series = client.search_for_series(dw.study_uid)
    assert sorted(s["00201209"]["Value"][0] for s in series) == sorted(SERIES_SIZES.values())
    assert len(client.search_for_series()) == len(SERIES_SIZES)  # /series, no study
    ct = next(s for s in series if s["00080060"]["Value"] == ["CT"])
    ct_uid = uid_of(ct, "0020000E")
    instances = client.search_for_instances(dw.study_uid, ct_uid)
    assert len(instances) == SERIES_SIZES["CT"]
    numbers = [i["00200013"]["Value"][0] for i in instances]
    assert numbers == sorted(numbers)
    assert len(client.search_for_instances(dw.study_uid)) == sum(SERIES_SIZES.values())
    assert len(client.search_for_instances()) == sum(SERIES_SIZES.values())


def test_search_matching_includefield_limit_offset(dw: DW) -> None:
    client = dw.client()
    assert client.search_for_studies(search_filters={"PatientID": dw.patient_id})
    assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})
    assert client.search_for_studies(search_filters={"StudyDate": "19000101-19000102"}) == []
    name = str(pydicom.dcmread(dw.study.series["CT"][0], stop_before_pixels=True).PatientName)
    wildcard = name[:3].lower() + "*"  # PN: case-insensitive, wildcards
    assert client.search_for_studies(search_filters={"PatientName": wildcard})
    pt = client.search_for_series(search_filters={"00080060": "PT"})  # by tag
    assert len(pt) == 1 and "0008103E" in pt[0]

    # includefield adds attributes; "all" every attribute of the level and above.
    plain = client.search_for_series(dw.study_uid)[0]
    assert "0020000D" in plain and "00180015" not in plain
    extra = client.search_for_series(dw.study_uid, fields=["BodyPartExamined"])[0]
    assert "00180015" in extra
    everything = dw.get(f"/series?includefield=all&StudyInstanceUID={dw.study_uid}")
    assert everything.status_code == 200
    assert "00100010" in everything.json()[0] and "00200052" in everything.json()[0]

    # limit/offset page through the instances in order.
    total = sum(SERIES_SIZES.values())
    pages = [client.search_for_instances(limit=10, offset=o) for o in range(0, total, 10)]
    uids = [uid_of(i, "00080018") for page in pages for i in page]
    assert len(uids) == total == len(set(uids))
    more = dw.get("/instances?limit=5")
    assert "offset=5" in more.headers["Warning"]
    fuzzy = dw.get("/studies?fuzzymatching=true")
    assert fuzzy.status_code == 200 and "fuzzymatching" in fuzzy.headers["Warning"]


def test_search_answers_no_content_and_bad_keys(dw: DW) -> None:
    assert dw.get("/studies?PatientID=nobody").status_code == 204
    for query, words in (
        ("NotAnAttribute=1", "not a DICOM attribute"),
        ("StudyDate=yesterday", "StudyDate"),
        ("limit=-1", "limit"),
        ("SeriesNumber=abc", "SeriesNumber"),
        ("00081111.00081150=1.2", "sequence"),
    ):
        response = dw.get(f"/series?{query}")
        assert response.status_code == 400, query
        assert words in response.json()["detail"], response.text
    assert dw.get("/studies").headers["content-type"].startswith("application/dicom+json")


# -- WADO-RS ---------------------------------------------------------------------------


def test_retrieve_study_series_instance_equal_what_was_stored(dw: DW) -> None:
    client = dw.client()
    sent = sent_files(dw)
    received = client.retrieve_study(dw.study_uid)  # default: Explicit VR Little Endian
    assert {str(ds.SOPInstanceUID) for ds in received} == set(sent)
    for ds in received:
        same_elements(ds, pydicom.dcmread(sent[str(ds.SOPInstanceUID)]))
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    first = pydicom.dcmread(dw.study.series["MR_T1"][0])
    series = client.retrieve_series(
        dw.study_uid, str(first.SeriesInstanceUID), media_types=(("application/dicom", "*"),)
    )
    assert len(series) == SERIES_SIZES["MR_T1"]
    # dicomweb-client does not ask for Implicit VR Little Endian: plain HTTP.
    implicit = (
        f'multipart/related; type="application/dicom"; transfer-syntax={ImplicitVRLittleEndian}'
    )
    path = (
        f"/studies/{dw.study_uid}/series/{first.SeriesInstanceUID}/instances/{first.SOPInstanceUID}"
    )
    response = dw.get(path, headers={"Accept": implicit})
    assert response.status_code == 200, response.text
    parts = multipart_parts(response)
    assert len(parts) == 1
    instance = pydicom.dcmread(BytesIO(parts[0]))
    assert instance.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    same_elements(instance, first)


def test_retrieve_refuses_what_it_cannot_produce(dw: DW) -> None:
    study = f"/studies/{dw.study_uid}"
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    response = dw.get(study, headers={"Accept": jpeg})
    assert response.status_code == 406 and "transfer-syntax" in response.json()["detail"]
    assert dw.get(study, headers={"Accept": "text/html"}).status_code == 406
    assert dw.get("/studies/1.2.3.4").status_code == 404


def test_metadata_frames_bulkdata(dw: DW) -> None:
    client = dw.client()
    path = dw.study.series["CT"][3]
    sent = pydicom.dcmread(path)
    series_uid, sop_uid = str(sent.SeriesInstanceUID), str(sent.SOPInstanceUID)
    metadata = client.retrieve_study_metadata(dw.study_uid)
    assert len(metadata) == sum(SERIES_SIZES.values())
    item = client.retrieve_instance_metadata(dw.study_uid, series_uid, sop_uid)
    assert item["00080018"]["Value"] == [sop_uid]
    assert item["00280010"]["Value"] == [sent.Rows]
    pixel_uri = item["7FE00010"]["BulkDataURI"]
    assert "InlineBinary" not in item["7FE00010"]
    assert len(client.retrieve_series_metadata(dw.study_uid, series_uid)) == SERIES_SIZES["CT"]
    # The BulkDataURI resolves to the stored value.
    response = dw.get(pixel_uri.removeprefix(dw.url))
    assert response.status_code == 200
    bulk = client.retrieve_bulkdata(pixel_uri)
    assert bulk == [sent.PixelData]
    frames = client.retrieve_instance_frames(dw.study_uid, series_uid, sop_uid, [1])
    assert frames == [sent.PixelData]
    with pytest.raises(requests.HTTPError):
        client.retrieve_instance_frames(dw.study_uid, series_uid, sop_uid, [2])


def test_rendered_and_thumbnails(dw: DW) -> None:
    sent = pydicom.dcmread(dw.study.series["CT"][5])
    instance = (
        f"/studies/{dw.study_uid}/series/{sent.SeriesInstanceUID}/instances/{sent.SOPInstanceUID}"
    )
    jpeg = dw.get(f"{instance}/rendered")
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    image = Image.open(BytesIO(jpeg.content))
    assert image.size == (sent.Columns, sent.Rows)
    png = dw.get(f"{instance}/frames/1/rendered?window=40,400", headers={"Accept": "image/png"})
    assert png.headers["content-type"] == "image/png"
    low, high = Image.open(BytesIO(png.content)).getextrema()
    assert high - low > 100  # windowed, not a flat image
    for path in (
        f"{instance}/thumbnail",
        f"/studies/{dw.study_uid}/series/{sent.SeriesInstanceUID}/thumbnail",
        f"/studies/{dw.study_uid}/thumbnail",
    ):
        response = dw.get(path)
        assert response.status_code == 200, path
        assert max(Image.open(BytesIO(response.content)).size) <= 128
    assert dw.get(f"{instance}/rendered", headers={"Accept": "video/mp4"}).status_code == 406


# -- auth ------------------------------------------------------------------------------


def test_auth_roles(dw: DW) -> None:
    response = dw.get("/studies", role=None)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert dw.get(f"/studies/{dw.study_uid}/metadata", role=None).status_code == 401
    assert dw.get("/studies", role="store").status_code == 403
    assert dw.get("/studies", role="admin").status_code == 200
    # The dashboard's session cookie works as well (the same-origin viewer).
    cookie = {"pacsnode_token": dw.tokens["read"]}
    assert requests.get(f"{dw.url}/studies", cookies=cookie, timeout=30).status_code == 200
    # A store token is not a read token for the admin API either.
    admin_api = f"{dw.node.api_url}/api/v1/studies"
    headers = {"Authorization": f"Bearer {dw.tokens['store']}"}
    assert requests.get(admin_api, headers=headers, timeout=30).status_code == 403

    # CORS for the configured origin only, and for /dicom-web only.
    def preflight(url: str, origin: str) -> requests.Response:
        return requests.options(
            url,
            headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
            timeout=30,
        )

    allowed = preflight(f"{dw.url}/studies", "http://viewer.example")
    assert allowed.headers["access-control-allow-origin"] == "http://viewer.example"
    assert (
        "access-control-allow-origin" not in preflight(f"{dw.url}/studies", "http://evil").headers
    )
    assert (
        "access-control-allow-origin" not in preflight(admin_api, "http://viewer.example").headers
    )


def test_retrieves_are_audited(dw: DW) -> None:
    from sqlalchemy import select

    from pacsnode.db.models import AuditEvent

    dw.dicomweb_touch = dw.dw_client_touch = None  # type: ignore[attr-defined]
    dw.client().retrieve_study_metadata(dw.study_uid)
    engine = create_db_engine(f"sqlite:///{dw.work / 'index.db'}")
    with engine.connect() as conn:
        rows = conn.execute(select(AuditEvent.action, AuditEvent.actor, AuditEvent.target)).all()
    engine.dispose()
    assert ("dicomweb.metadata", "token:dicomweb-read", dw.study_uid) in rows
    assert any(r.action == "dicomweb.search" for r in rows)


# -- STOW-RS ---------------------------------------------------------------------------


def multipart_body(parts: list[tuple[str, bytes]], boundary: str = "pacsnode-test") -> bytes:
    body = b""
    for part_type, data in parts:
        body += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def stow(
    dw: DW,
    body: bytes,
    *,
    study: str | None = None,
    role: str = "store",
    content_type: str = 'multipart/related; type="application/dicom"; boundary=pacsnode-test',
) -> requests.Response:
    return requests.post(
        dw.url + (f"/studies/{study}" if study else "/studies"),
        data=body,
        headers={
            "Authorization": f"Bearer {dw.tokens[role]}",
            "Content-Type": content_type,
            "Accept": "application/dicom+json",
        },
        timeout=120,
    )


def count_instances(dw: DW) -> int:
    return len(dw.client().search_for_instances())


def test_stow_a_phantom_study_with_dicomweb_client(dw: DW) -> None:
    study = write_study(dw.work / "stow-phantom", StudySpec(seed=22, size=32, slices=6))
    datasets = [pydicom.dcmread(p) for paths in study.series.values() for p in paths]
    study_uid = str(datasets[0].StudyInstanceUID)
    answer = dw.client("store").store_instances(datasets)
    referenced = answer.ReferencedSOPSequence
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced} == {
        str(ds.SOPInstanceUID) for ds in datasets
    }
    assert "FailedSOPSequence" not in answer
    assert answer.RetrieveURL.endswith(f"/studies/{study_uid}")
    # Indexed before the answer: searchable and retrievable at once.
    client = dw.client()
    assert client.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    retrieved = {str(ds.SOPInstanceUID): ds for ds in client.retrieve_study(study_uid)}
    for ds in datasets:
        same_elements(retrieved[str(ds.SOPInstanceUID)], ds)


def test_stow_every_transfer_syntax_the_node_accepts(dw: DW) -> None:
    from tests.test_storage_scp import dataset_bytes, sendable_testdata

    chosen: dict[str, Path] = {}
    uids: set[str] = set()  # some test files share a SOP Instance UID
    for path, syntax, has_uids in sendable_testdata():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        if has_uids and syntax not in chosen and uid not in uids:
            chosen[syntax] = path
            uids.add(uid)
    assert len(chosen) >= 8, chosen
    parts = [("application/dicom", path.read_bytes()) for path in chosen.values()]
    response = stow(dw, multipart_body(parts))
    assert response.status_code == 200, response.text
    client = dw.client()
    for syntax, path in chosen.items():
        sent = pydicom.dcmread(path, stop_before_pixels=True)
        instance = (
            f"/studies/{sent.StudyInstanceUID}/series/{sent.SeriesInstanceUID}"
            f"/instances/{sent.SOPInstanceUID}"
        )
        as_stored = dw.get(
            instance,
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        assert as_stored.status_code == 200, syntax
        (part,) = multipart_parts(as_stored)
        copy = dw.work / f"stow-{syntax}.dcm"
        copy.write_bytes(part)
        assert dataset_bytes(copy) == dataset_bytes(path), syntax
        assert client.search_for_instances(
            search_filters={"SOPInstanceUID": str(sent.SOPInstanceUID)}
        )[0]["00083002"]["Value"] == [syntax]


def test_stow_refusals_per_instance(dw: DW) -> None:
    ct = dw.study.series["CT"][0].read_bytes()
    other = write_study(dw.work / "stow-other", StudySpec(seed=23, size=32, slices=2))
    good = other.series["CT"][0]
    before = count_instances(dw)
    # To another study's URL: 0xA900 for the instance of this study, the other stored.
    wrong_study = "1.2.826.0.1.3680043.8.498.1"
    response = stow(dw, multipart_body([("application/dicom", ct)]), study=wrong_study)
    assert response.status_code == 409
    failed = response.json()["00081198"]["Value"]
    assert failed[0]["00081197"]["Value"] == [0xA900]
    assert "StudyInstanceUID differs" in response.headers["Warning"]
    # A non-DICOM part and a part of another media type beside a good one: 202.
    body = multipart_body(
        [
            ("application/dicom", b"this is not DICOM at all" * 10),
            ("text/plain", b"hello"),
            ("application/dicom", good.read_bytes()),
        ]
    )
    response = stow(dw, body)
    assert response.status_code == 202, response.text
    reasons = [i["00081197"]["Value"][0] for i in response.json()["00081198"]["Value"]]
    assert reasons == [0xC000, 0xC000]
    assert len(response.json()["00081199"]["Value"]) == 1
    assert (
        "part 1" in response.headers["Warning"]
        and "not application/dicom" in response.headers["Warning"]
    )
    assert count_instances(dw) == before + 1


def _with_uid(path: Path, **uids: str) -> bytes:
    import warnings

    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():  # pydicom warns about the invalid UIDs made here
        warnings.simplefilter("ignore", UserWarning)
        for keyword, value in uids.items():
            setattr(ds, keyword, value)
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_hostile_stow_bodies(dw: DW) -> None:
    import socket
    from urllib.parse import urlsplit

    source = dw.study.series["PT"][0]
    good = source.read_bytes()
    before = count_instances(dw)
    spool = dw.node.data_dir / "spool"
    files_before = sorted(p for p in spool.rglob("*") if p.is_file())

    def refused(response: requests.Response, status: int, words: str) -> None:
        assert response.status_code == status, response.text
        assert words in response.json()["detail"], response.text

    body = multipart_body([("application/dicom", good)])
    # Wrong boundary, missing boundary, not multipart, another part type.
    refused(
        stow(dw, body, content_type='multipart/related; type="application/dicom"; boundary=other'),
        400,
        "no closing boundary",
    )
    refused(
        stow(dw, body, content_type='multipart/related; type="application/dicom"'),
        400,
        "no boundary",
    )
    refused(stow(dw, good, content_type="application/dicom"), 415, "multipart/related")
    refused(
        stow(
            dw,
            body,
            content_type='multipart/related; type="application/dicom+xml"; boundary=pacsnode-test',
        ),
        415,
        "application/dicom",
    )
    # A truncated part: the body stops in the middle of the instance.
    refused(stow(dw, body[: len(body) // 2]), 400, "truncated")
    # No parts at all.
    refused(stow(dw, b"--pacsnode-test--\r\n"), 400, "no parts")

    # A body past dicomweb.max_request_mb (64 MiB here), sent chunked (no Content-Length).
    def endless() -> Iterator[bytes]:
        yield b"--pacsnode-test\r\nContent-Type: application/dicom\r\n\r\n" + good
        for _ in range(80):
            yield b"\0" * 2**20

    response = requests.post(
        dw.url + "/studies",
        data=endless(),
        headers={
            "Authorization": f"Bearer {dw.tokens['store']}",
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=pacsnode-test',
        },
        timeout=120,
    )
    refused(response, 413, "max_request_mb")
    # One part past dicomweb.max_part_mb (16 MiB): that instance only is refused.
    big = good + b"\0" * (17 * 2**20)
    response = stow(dw, multipart_body([("application/dicom", big)]))
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
    assert "max_part_mb" in response.headers["Warning"]
    # A huge declared Content-Length: refused before anything is read.
    url = urlsplit(dw.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as conn:
        conn.sendall(
            (
                "POST /dicom-web/studies HTTP/1.1\r\n"
                f"Host: {url.netloc}\r\n"
                f"Authorization: Bearer {dw.tokens['store']}\r\n"
                'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
                "Content-Length: 1000000000000\r\n\r\n--b\r\n"
            ).encode()
        )
        head = conn.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head
    # Path-like and malformed UIDs: refused per instance, never a file outside the spool.
    for uid in ("../../../../tmp/evil", "1.2.3/../../x", "1.2.3.abc", "1." + "2" * 70):
        response = stow(
            dw, multipart_body([("application/dicom", _with_uid(source, SOPInstanceUID=uid))])
        )
        assert response.status_code == 409, uid
        assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
        assert "not a valid UID" in response.headers["Warning"]
        assert "00081155" not in response.json()["00081198"]["Value"][0] or uid not in response.text
    response = stow(dw, body, study="../../etc")
    assert response.status_code in (400, 404)
    # Nothing stored, nothing left in the incoming folder, the node still serves.
    assert count_instances(dw) == before
    assert sorted(p for p in spool.rglob("*") if p.is_file()) == files_before
    assert not (Path("/tmp") / "evil").exists()
    assert stow(dw, body).status_code == 200


def test_stow_auth(dw: DW) -> None:
    body = multipart_body([("application/dicom", dw.study.series["CT"][0].read_bytes())])
    response = requests.post(
        dw.url + "/studies",
        data=body,
        headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=pacsnode-test'
        },
        timeout=30,
    )
    assert response.status_code == 401
    response = stow(dw, body, role="read")
    assert response.status_code == 403 and "store" in response.json()["detail"]
    assert stow(dw, body, role="admin").status_code == 200


# -- C-GET and WADO-RS -----------------------------------------------------------------


def test_c_get_and_wado_rs_give_the_same_instances(dw: DW) -> None:
    import os
    import subprocess

    out = dw.work / "get"
    out.mkdir()
    result = subprocess.run(
        [require_binary("getscu"), "-S", "-aet", "GETSCU", "-aec", dw.node.ae_title,
         "-od", str(out), "127.0.0.1", str(dw.node.port), "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={dw.study_uid}"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    by_get = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, out.iterdir())}
    accept = (("application/dicom", "*"),)
    by_wado = {
        str(ds.SOPInstanceUID): ds
        for ds in dw.client().retrieve_study(dw.study_uid, media_types=accept)
    }
    assert set(by_get) == set(by_wado) == set(sent_files(dw))
    for uid, ds in by_get.items():
        same_elements(by_wado[uid], ds)


# -- a study stored by STOW-RS runs through the pipeline -------------------------------


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_stowed_study_gets_a_job_that_completes(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pacsnode.lab.phantom import SeriesSpec, write_ct_series
    from tests.support import wait_for
    from tests.test_assembly import FAST, jobs

    node = make_node(config=node_config(completion=FAST)).start()
    paths = write_ct_series(tmp_path / "ct", SeriesSpec(slices=12, rows=64, columns=64, seed=31))
    datasets = [pydicom.dcmread(p) for p in sorted((tmp_path / "ct").iterdir())]
    assert len(datasets) == 12 and paths is not None
    tokens = make_tokens(node.database_url)
    client = DICOMwebClient(
        url=f"{node.api_url}/dicom-web", headers={"Authorization": f"Bearer {tokens['store']}"}
    )
    answer = client.store_instances(datasets)
    assert len(answer.ReferencedSOPSequence) == 12

    def finished() -> list[object] | None:
        found = jobs(node)
        return found if found and all(j.state in ("succeeded", "failed") for j in found) else None

    (job,) = wait_for(finished, timeout=120, what="the STOW-RS study's job")
    assert (job.state, job.error) == ("succeeded", "")


# -- memory: uploads and retrievals stream ---------------------------------------------


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _peak_growth_mib(pid: int, action: Callable[[], object]) -> float:
    """How far the process's resident memory rose above where it was while
    ``action`` ran (Linux: the peak is reset through clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = _kib(pid, "VmRSS")
    action()
    return (_kib(pid, "VmHWM") - before) / 1024


def big_study(folder: Path, count: int, rows: int, columns: int) -> list[Path]:
    """``count`` CT images of rows x columns 16-bit pixels (one study, one
    series), from a phantom slice with its pixel data enlarged."""
    import numpy as np
    from pydicom.uid import generate_uid

    from pacsnode.lab.phantom import SeriesSpec, write_ct_series

    write_ct_series(folder / "template", SeriesSpec(slices=1, rows=32, columns=32, seed=41))
    template = pydicom.dcmread(next((folder / "template").iterdir()))
    study_uid, series_uid = generate_uid(), generate_uid()
    rng = np.random.default_rng(41)
    paths = []
    for n in range(count):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1
        ds.Rows, ds.Columns = rows, columns
        ds.PixelData = rng.integers(0, 2000, (rows, columns), dtype=np.uint16).tobytes()
        path = folder / f"big{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_a_100_mb_study_streams_in_and_out(tmp_path: Path) -> None:
    import subprocess
    import sys
    import threading

    paths = big_study(tmp_path / "big", count=100, rows=512, columns=1024)  # 100 x 1 MiB
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    node = Node(data_dir=tmp_path / "node", database_url=f"sqlite:///{tmp_path / 'index.db'}",
                config=node_config())  # fmt: skip
    # The API alone (`pacsnode api`): one process whose memory is measured.
    api = subprocess.Popen(
        [sys.executable, "-m", "pacsnode", "api"],
        env=node.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert api.stdout is not None
        line = api.stdout.readline()
        assert line.startswith("pacsnode api:"), line + api.stdout.read()
        threading.Thread(target=api.stdout.read, daemon=True).start()  # drain the log
        url = line.split(":", 1)[1].strip() + "/dicom-web"
        tokens = make_tokens(node.database_url)
        headers = {"Authorization": f"Bearer {tokens['admin']}"}
        boundary = "pacsnode-big"
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'

        def upload(files: list[Path]) -> None:
            def body() -> Iterator[bytes]:
                for path in files:
                    yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    with path.open("rb") as fp:
                        while chunk := fp.read(256 * 1024):
                            yield chunk
                    yield b"\r\n"
                yield f"--{boundary}--\r\n".encode()

            response = requests.post(
                f"{url}/studies", data=body(), timeout=300,
                headers={**headers, "Content-Type": content_type},
            )  # fmt: skip
            assert response.status_code == 200, response.text

        received = []

        def download() -> None:
            accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
            with requests.get(
                f"{url}/studies/{study_uid}", headers={**headers, "Accept": accept},
                stream=True, timeout=300,
            ) as response:  # fmt: skip
                assert response.status_code == 200
                received.append(sum(len(c) for c in response.iter_content(256 * 1024)))

        # Warm up (imports, the index writer, first connections) with two instances.
        upload(paths[:2])
        download()
        upload_growth = _peak_growth_mib(api.pid, lambda: upload(paths[2:]))
        retrieve_growth = _peak_growth_mib(api.pid, download)
        size = sum(p.stat().st_size for p in paths)
        print(f"RSS growth: STOW-RS {upload_growth:.1f} MiB, WADO-RS {retrieve_growth:.1f} MiB")
        assert size > 100 * 10**6 and received[-1] > size
        assert upload_growth < 50, (
            f"STOW-RS of {size / 2**20:.0f} MiB grew RSS by {upload_growth:.1f} MiB"
        )
        assert retrieve_growth < 50, (
            f"WADO-RS of {size / 2**20:.0f} MiB grew RSS by {retrieve_growth:.1f} MiB"
        )
    finally:
        api.terminate()
        api.wait(timeout=30)


# -- Orthanc's DICOMweb client against pacsnode --------------------------------------


def test_orthanc_dicomweb_client_finds_and_retrieves_a_pacsnode_study(dw: DW) -> None:
    import json

    from tests.orthanc import Orthanc, orthanc_binary

    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    binary = orthanc_binary()
    if binary is None or not plugin.exists():
        message = "Orthanc with its DICOMweb plugin is not installed (orthanc-dicomweb)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)

    class DicomwebOrthanc(Orthanc):
        def configure(self) -> None:
            super().configure()
            path = self.home / "config.json"
            config = json.loads(path.read_text())
            config["Plugins"] = [str(plugin)]
            config["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {
                    "pacsnode": {
                        "Url": f"{dw.url}/",
                        "HttpHeaders": {"Authorization": f"Bearer {dw.tokens['read']}"},
                    }
                },
            }
            path.write_text(json.dumps(config))

    orthanc = DicomwebOrthanc(dw.work / "orthanc-client", binary).start()
    try:
        found = orthanc.post(
            "/dicom-web/servers/pacsnode/qido",
            {"Uri": "/studies", "Arguments": {"PatientID": dw.patient_id}},
        )
        # Orthanc's client simplifies the DICOM JSON it received: Value is a string.
        assert [item["0020000D"]["Value"] for item in found] == [dw.study_uid]
        orthanc.post(
            "/dicom-web/servers/pacsnode/retrieve", {"Resources": [{"Study": dw.study_uid}]}
        )
        assert orthanc.count_instances() == sum(SERIES_SIZES.values()), orthanc.log()[-3000:]
        sent = sent_files(dw)
        for instance_id in orthanc.get("/instances"):
            ds = pydicom.dcmread(BytesIO(orthanc.file(instance_id)))
            assert ds.PixelData == pydicom.dcmread(sent[str(ds.SOPInstanceUID)]).PixelData
    finally:
        orthanc.stop()
