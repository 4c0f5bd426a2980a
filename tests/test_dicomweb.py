"""The DICOMweb server (PS3.18) of a real ``pacsnode serve`` over HTTP, with
dicomweb-client (Python), Orthanc's DICOMweb client, dcmtk's getscu and raw
requests: QIDO-RS, WADO-RS (instances, metadata, frames, bulk data,
rendered, thumbnails), auth, audit. Every instance retrieved is compared,
element for element, with the file sent by C-STORE (tests/dicomweb_node.py).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacsnode.db.session import create_db_engine
from tests.dicomweb_node import (
    DW,
    SERIES_SIZES,
    dw,
    multipart_parts,
    same_elements,
    sent_files,
    uid_of,
)
from tests.support import IN_CI, require_binary

__all__ = ["dw"]  # the module-scoped node fixture


# -- QIDO-RS ---------------------------------------------------------------------------


def test_search_every_level(dw: DW) -> None:
    client = dw.client()
    studies = client.search_for_studies()
    assert dw.study_uid in [uid_of(s, "0020000D") for s in studies]
    study = next(s for s in studies if uid_of(s, "0020000D") == dw.study_uid)
    assert study["00100020"]["Value"] == [dw.patient_id]
    assert study["00201208"]["Value"] == [sum(SERIES_SIZES.values())]
    assert sorted(study["00080061"]["Value"]) == ["CT", "MR", "PT"]
    assert study["00081190"]["Value"] == [f"{dw.url}/studies/{dw.study_uid}"]

    series = client.search_for_series(dw.study_uid)
    assert sorted(s["00201209"]["Value"][0] for s in series) == sorted(SERIES_SIZES.values())
    mine = {"PatientID": dw.patient_id}  # other tests store other patients' studies
    assert len(client.search_for_series(search_filters=mine)) == len(SERIES_SIZES)  # /series
    ct = next(s for s in series if s["00080060"]["Value"] == ["CT"])
    ct_uid = uid_of(ct, "0020000E")
    instances = client.search_for_instances(dw.study_uid, ct_uid)
    assert len(instances) == SERIES_SIZES["CT"]
    numbers = [i["00200013"]["Value"][0] for i in instances]
    assert numbers == sorted(numbers)
    assert len(client.search_for_instances(dw.study_uid)) == sum(SERIES_SIZES.values())
    assert len(client.search_for_instances(search_filters=mine)) == sum(SERIES_SIZES.values())


def test_search_matching_includefield_limit_offset(dw: DW) -> None:
    client = dw.client()
    assert client.search_for_studies(search_filters={"PatientID": dw.patient_id})
    assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})
    assert client.search_for_studies(search_filters={"StudyDate": "19000101-19000102"}) == []
    name = str(pydicom.dcmread(dw.study.series["CT"][0], stop_before_pixels=True).PatientName)
    wildcard = name[:3].lower() + "*"  # PN: case-insensitive, wildcards
    assert client.search_for_studies(search_filters={"PatientName": wildcard})
    pt = client.search_for_series(search_filters={"00080060": "PT", "PatientID": dw.patient_id})
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
    mine = {"PatientID": dw.patient_id}
    pages = [
        client.search_for_instances(search_filters=mine, limit=10, offset=o)
        for o in range(0, total, 10)
    ]
    uids = [uid_of(i, "00080018") for page in pages for i in page]
    assert len(uids) == total == len(set(uids))
    more = dw.get(f"/instances?limit=5&PatientID={dw.patient_id}")
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

    dw.client().retrieve_study_metadata(dw.study_uid)
    engine = create_db_engine(f"sqlite:///{dw.work / 'index.db'}")
    with engine.connect() as conn:
        rows = conn.execute(select(AuditEvent.action, AuditEvent.actor, AuditEvent.target)).all()
    engine.dispose()
    assert ("dicomweb.metadata", "token:dicomweb-read", dw.study_uid) in rows
    assert any(r.action == "dicomweb.search" for r in rows)


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


def test_dicomweb_can_be_switched_off(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from pacsnode.api import create_app
    from pacsnode.core.settings import load_settings
    from pacsnode.db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'index.db'}"
    engine = create_db_engine(url)
    upgrade(engine)
    on = load_settings(database_url=url, data_dir=tmp_path / "data")
    off = load_settings(database_url=url, data_dir=tmp_path / "data", dicomweb={"enabled": False})
    with TestClient(create_app(on, engine)) as client:
        assert client.get("/dicom-web/studies").status_code == 401  # there, and not anonymous
    with TestClient(create_app(off, engine)) as client:
        assert client.get("/dicom-web/studies").status_code == 404
    engine.dispose()


def test_segmentation_frames_are_packed_bits(dw: DW) -> None:
    """A 1-bit DICOM-SEG (highdicom) of a 30x30 CT, both stored by STOW-RS in
    a study of their own: each frame comes back packed on its own, although
    frames 2 and 3 start inside a byte of the stored Pixel Data (900 bits each)."""
    import highdicom as hd
    import numpy as np
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from pacsnode.lab.phantom import SeriesSpec, write_ct_series

    ct = sorted(write_ct_series(dw.work / "seg-ct", SeriesSpec(slices=3, rows=30, columns=30)))
    sources = [pydicom.dcmread(p) for p in ct]
    dw.client("store").store_instances(sources)
    mask = np.zeros((3, 30, 30), dtype=bool)
    mask[0, 10:20, 10:30] = True
    mask[1, 5:9, 3:4] = True
    mask[2, 20:29, 2:5] = True
    algorithm = hd.AlgorithmIdentificationSequence(
        name="test", family=codes.cid7162.ArtificialIntelligence, version="1"
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="test region (for testing)",
                segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=codes.SCT.Tissue,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        ],
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="pacsnode tests",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        omit_empty_frames=False,
    )
    dw.client("store").store_instances([seg])
    frames = dw.client().retrieve_instance_frames(
        str(seg.StudyInstanceUID), str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID), [1, 2, 3]
    )
    from pydicom.pixels import pack_bits

    assert frames == [pack_bits(mask[i].astype(np.uint8), pad=False) for i in range(3)]
