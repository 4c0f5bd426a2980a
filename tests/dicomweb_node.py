"""A ``pacsnode serve`` with a small phantom study for the DICOMweb tests
(tests/test_dicomweb.py, tests/test_stow.py), and helpers to compare what
DICOMweb returns with what was sent.

The node (one per test module): a phantom study (CT 10, PT 8, MR 3 + 3
slices, 64² CT) sent by C-STORE with storescu; no models run; tokens of every
role; small STOW-RS limits (64 MiB a request, 16 MiB a part) so the limit
tests stay fast; CORS for one origin.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from pacsnode.db.session import create_db_engine
from pacsnode.db.tokens import create_token
from pacsnode.lab.phantom import StudySpec, WrittenStudy, write_study
from tests.support import Node, node_config, storescu

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
