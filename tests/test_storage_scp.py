"""The storage SCP against dcmtk on real sockets, on SQLite and PostgreSQL."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts
from sqlalchemy import select

from pacsnode.db.models import Instance
from pacsnode.db.session import create_db_engine
from pacsnode.lab.phantom import SeriesSpec, write_ct_series
from tests.support import Node, free_port, require_binary, wait_for

pytestmark = pytest.mark.dcmtk

# storescu proposes uncompressed syntaxes unless told otherwise (one flag per
# syntax); with the matching flag it sends the file's own encoding unchanged.
STORESCU_FLAG = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}
STORAGE_CLASSES = {str(c.abstract_syntax) for c in StoragePresentationContexts}


@functools.cache
def sendable_testdata() -> list[tuple[Path, str, bool]]:
    """(path, transfer syntax, has filing UIDs) of every pydicom test file a
    storage SCU can send: Part 10 with a storage SOP class and instance UID."""
    files = []
    for name in get_testdata_files():
        path = Path(name)
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if str(ds.get("SOPClassUID", "")) not in STORAGE_CLASSES or "SOPInstanceUID" not in ds:
            continue
        if ts is None or str(ts) not in STORESCU_FLAG:
            continue
        has_uids = "StudyInstanceUID" in ds and "SeriesInstanceUID" in ds
        files.append((path, str(ts), has_uids))
    return files


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file: everything after the file meta,
    inflated for the Deflated transfer syntax (zlib output is not canonical)."""
    meta = read_file_meta_info(path)
    # Preamble, 'DICM', the group length element (12 bytes), then the group.
    offset = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    raw = path.read_bytes()[offset:]
    if meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        return zlib.decompress(raw, -zlib.MAX_WBITS)
    return raw


def same_data_elements(stored: Path, original: Path) -> bool:
    """Identical data elements (tag, VR, value, pixel data included), for
    files the test sender had to decode and re-encode."""
    return _elements(pydicom.dcmread(stored)) == _elements(pydicom.dcmread(original))


def _elements(ds: pydicom.Dataset) -> list[tuple[object, ...]]:
    """(tag, VR, value) of every element, recursing into sequence items."""
    out: list[tuple[object, ...]] = []
    for elem in ds:
        if elem.VR == "SQ":
            out.append((elem.tag, "SQ", [_elements(item) for item in elem.value]))
        else:
            out.append((elem.tag, elem.VR, elem.value))
    return out


def storescu(node: Node, *options: str, files: list[str]) -> subprocess.CompletedProcess[str]:
    exe = require_binary("storescu")
    return subprocess.run(
        [exe, "-aec", node.ae_title, "-R", *options, "127.0.0.1", str(node.port), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )


def stored_path(node: Node, database_url: str, sop_instance_uid: str) -> Path | None:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            rel = conn.execute(
                select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
            ).scalar_one_or_none()
    finally:
        engine.dispose()
    return None if rel is None else node.data_dir / "spool" / rel


def test_echoscu(node: Node) -> None:
    exe = require_binary("echoscu")
    result = subprocess.run(
        [exe, "-aec", "PACSNODE", "127.0.0.1", str(node.port)], capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_ct_series_stored_byte_identical_and_indexed(
    node: Node, database_url: str, tmp_path: Path
) -> None:
    paths = write_ct_series(tmp_path / "ct", SeriesSpec(slices=24, rows=128, columns=128))
    result = storescu(node, "+sd", files=[str(tmp_path / "ct")])
    assert result.returncode == 0, result.stderr
    for path in paths:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        stored = stored_path(node, database_url, uid)
        assert stored is not None, f"{path.name} not indexed"
        assert dataset_bytes(stored) == dataset_bytes(path)
    # Logs carry UIDs and AE titles, never patient names or IDs.
    assert "PHANTOM-0001" not in node.log() and "Phantom" not in node.log()
    listing = node.cli("studies", "--json")
    assert listing.returncode == 0, listing.stderr
    (study,) = [json.loads(line) for line in listing.stdout.splitlines()]
    assert study["instance_count"] == 24 and study["series_count"] == 1
    assert study["modalities"] == ["CT"]
    # Sending the same series again changes nothing: idempotent by SOP Instance UID.
    assert storescu(node, "+sd", files=[str(tmp_path / "ct")]).returncode == 0
    again = [json.loads(line) for line in node.cli("studies", "--json").stdout.splitlines()]
    assert [s["instance_count"] for s in again] == [24]


def send_with_pynetdicom(node: Node, path: Path, ts: str) -> int:
    """Send a file's encoded data set unchanged; return the C-STORE status."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ts)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    except ValueError:  # pynetdicom cannot encode it either
        return -1
    finally:
        assoc.release()


@pytest.fixture
def reference_scp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp in bit-preserving mode: records exactly what storescu
    puts on the wire, so pacsnode's copy can be compared byte for byte."""
    exe = require_binary("storescp")
    out = tmp_path / "reference"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-aet", "STORESCP", "+B", "+xa", "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    echoscu = require_binary("echoscu")
    wait_for(
        lambda: (
            subprocess.run(
                [echoscu, "-aec", "STORESCP", "127.0.0.1", str(port)], capture_output=True
            ).returncode
            == 0
        ),
        what="storescp",
    )
    yield port, out
    proc.terminate()
    proc.wait(timeout=10)


# Byte identity does not depend on the index backend: SQLite only, to save time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_pydicom_test_file_in_its_own_transfer_syntax(
    node: Node, database_url: str, reference_scp: tuple[int, Path]
) -> None:
    ref_port, ref_dir = reference_scp
    files = sendable_testdata()
    syntaxes = {ts for _, ts, _ in files}
    assert len(files) >= 140 and len(syntaxes) == len(STORESCU_FLAG)
    refused, via_pynetdicom, unsendable = [], [], []
    for path, ts, has_uids in files:
        result = storescu(node, "-v", STORESCU_FLAG[ts], files=[str(path)])
        if "Requesting Association" not in result.stderr:
            # dcmtk cannot parse a few files pydicom reads (odd VRs, odd
            # lengths); they are sent unchanged with pynetdicom instead.
            via_pynetdicom.append(path.name)
            status = send_with_pynetdicom(node, path, ts)
            if status == -1:
                unsendable.append(path.name)
                continue
            sent_ok, refused_a900 = status == 0x0000, status == 0xA900
        else:
            sent_ok = result.returncode == 0
            refused_a900 = "DataSetDoesNotMatchSOPClass" in result.stderr  # 0xA900
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        stored = stored_path(node, database_url, uid)
        if not has_uids:
            # Study/Series Instance UID are Type 1 in every IOD: without them
            # the instance cannot be filed or retrieved, so it is refused.
            assert refused_a900 and not sent_ok, f"{path.name}: {result.stderr}"
            refused.append(path.name)
            continue
        assert sent_ok, f"{path.name}: {result.stderr}"
        assert stored is not None, f"{path.name} ({ts}) not indexed"
        if path.name in via_pynetdicom:
            assert same_data_elements(stored, path), f"{path.name} differs"
            continue
        # What storescu sent on the wire, as recorded by the reference peer.
        for old in ref_dir.iterdir():
            old.unlink()
        reference = subprocess.run(
            [
                require_binary("storescu"),
                "-aec",
                "STORESCP",
                "-R",
                STORESCU_FLAG[ts],
                "127.0.0.1",
                str(ref_port),
                str(path),
            ],
            capture_output=True,
            timeout=60,
        )
        assert reference.returncode == 0, reference.stderr
        (wire,) = ref_dir.iterdir()
        assert dataset_bytes(stored) == dataset_bytes(wire), f"{path.name} differs"
    assert sorted(refused) == [
        "JPEGLSNearLossless_08.dcm",
        "JPEGLSNearLossless_16.dcm",
        "SC_rgb_jls_lossy_line.dcm",
        "SC_rgb_jls_lossy_sample.dcm",
    ]
    assert len(via_pynetdicom) <= 10, via_pynetdicom
    # Its ImageType has a blank VR: neither dcmtk nor pynetdicom will send it.
    assert unsendable == ["SC_rgb_jpeg.dcm"]


def test_missing_study_uid_gets_a900_with_a_reason(node: Node) -> None:
    (path,) = [p for p, _, ok in sendable_testdata() if p.name == "JPEGLSNearLossless_08.dcm"]
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert assoc.is_established
    rsp = assoc.send_c_store(ds)
    assoc.release()
    assert rsp.Status == 0xA900
    assert "StudyInstanceUID" in rsp.ErrorComment
    assert not list((node.data_dir / "spool").rglob("*.dcm"))
    wait_for(lambda: "refused with 0xA900" in node.log(), what="refusal logged")
