"""STOW-RS (PS3.18 §10.5) of a real ``pacsnode serve``: a phantom study with
dicomweb-client, pydicom's test files in every transfer syntax the node
accepts over DIMSE, refusals per instance, hostile bodies (nothing stored,
the node still serving), auth, a stored study running through the pipeline
(real Celery worker), and the memory a 100 MB study costs the server going
in and out (measured).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import numpy
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from pacsnode.lab.phantom import StudySpec, write_study
from tests.dicomweb_node import DW, dw, make_tokens, multipart_parts, same_elements
from tests.support import Node, node_config

__all__ = ["dw"]  # the module-scoped node fixture
FRAMES = 'multipart/related; type="application/octet-stream"'


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
        # The default (Explicit VR Little Endian): compressed ones are decoded.
        if syntax == ExplicitVRBigEndian:
            assert dw.get(instance).status_code == 406  # not converted: ask for *
            continue
        default = dw.get(instance)
        if default.status_code == 406:  # pixel data no installed decoder can read
            assert "transfer-syntax=*" in default.json()["detail"]
            assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed
            with pytest.raises(Exception):  # noqa: B017 - whichever the decoders raise
                _ = pydicom.dcmread(path).pixel_array
            continue
        assert default.status_code == 200, (syntax, default.text)
        (part,) = multipart_parts(default)
        converted = pydicom.dcmread(BytesIO(part))
        assert converted.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert converted.SOPInstanceUID == sent.SOPInstanceUID
        original = pydicom.dcmread(path)
        if "PixelData" not in original:
            assert dw.get(f"{instance}/frames/1", headers={"Accept": FRAMES}).status_code == 404
            continue
        try:
            pixels = original.pixel_array
        except ValueError:  # a pydicom test file made to fail decoding (NumberOfFrames "1A")
            continue
        assert numpy.array_equal(converted.pixel_array, pixels), syntax
        # Frames: decoded by default, as stored with transfer-syntax=*.
        frames = dw.get(f"{instance}/frames/1", headers={"Accept": FRAMES})
        assert frames.status_code == 200, (syntax, frames.text)
        frame = multipart_parts(frames)[0]
        expected = pixels if int(original.get("NumberOfFrames") or 1) == 1 else pixels[0]
        assert frame == expected.astype(expected.dtype.newbyteorder("<")).tobytes(), syntax


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
    # A huge length declared inside the data set's header swallows the rest of
    # it: refused (the UIDs it hid are missing, or it cannot be parsed).
    marker = b"\x08\x00\x30\x10LO"  # (0008,1030) Study Description, explicit VR LO
    at = good.index(marker)
    huge = good[:at] + b"\x08\x00\x30\x10UN\x00\x00\xf0\xff\xff\x7f" + good[at + 8 :]
    response = stow(dw, multipart_body([("application/dicom", huge)]))
    assert response.status_code == 409
    reason = response.json()["00081198"]["Value"][0]["00081197"]["Value"][0]
    assert reason in (0xC000, 0xA900), hex(reason)
    assert (
        "cannot be parsed" in response.headers["Warning"]
        or "missing" in response.headers["Warning"]
    )
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


def test_stow_below_the_disk_watermark_is_refused(tmp_path: Path) -> None:
    """``min_free_disk_mb`` applies to STOW-RS as to C-STORE: 0xA700, nothing stored."""
    import subprocess
    import sys

    node = Node(data_dir=tmp_path / "node", database_url=f"sqlite:///{tmp_path / 'index.db'}",
                config=node_config(min_free_disk_mb=10**9))  # fmt: skip
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
        url = line.split(":", 1)[1].strip() + "/dicom-web"
        tokens = make_tokens(node.database_url)
        study = write_study(tmp_path / "study", StudySpec(seed=24, size=32, slices=2))
        body = multipart_body([("application/dicom", study.series["CT"][0].read_bytes())])
        response = requests.post(
            f"{url}/studies", data=body, timeout=60,
            headers={"Authorization": f"Bearer {tokens['store']}",
                     "Content-Type": 'multipart/related; type="application/dicom"; '
                     "boundary=pacsnode-test"},
        )  # fmt: skip
        assert response.status_code == 409, response.text
        assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
        assert "watermark" in response.headers["Warning"]
        search = requests.get(
            f"{url}/instances", headers={"Authorization": f"Bearer {tokens['read']}"}, timeout=30
        )
        assert search.status_code == 204
        assert not [p for p in (node.data_dir / "spool").rglob("*") if p.is_file()]
    finally:
        api.terminate()
        api.wait(timeout=30)


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
    # Every store is in the audit trail, with the token's name and the outcome.
    from sqlalchemy import select

    from pacsnode.db.models import AuditEvent
    from pacsnode.db.session import create_db_engine

    engine = create_db_engine(dw.node.database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(AuditEvent.action, AuditEvent.actor, AuditEvent.outcome).where(
                AuditEvent.action == "dicomweb.store"
            )
        ).all()
    engine.dispose()
    assert ("dicomweb.store", "token:dicomweb-admin", "ok") in rows
    assert ("dicomweb.store", "token:dicomweb-store", "refused") in rows


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
