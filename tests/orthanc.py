"""A real Orthanc PACS (the Debian package) for end-to-end tests and benchmarks.

Each :class:`Orthanc` has its own configuration, storage and index in a
folder, free ports and the AE title ``ORTHANC``; it knows pacsnode as the
modality ``pacsnode`` so that its REST call ``/modalities/pacsnode/store``
pushes a study to the node, as a PACS forwarding rule would. It can be
stopped and started again on the same ports and storage (an outage).

With ``dicomweb=True`` it loads its DICOMweb plugin (Debian
``orthanc-dicomweb``) under ``/dicom-web/``: a STOW-RS destination for
pacsnode's results, and a DICOMweb client of other servers
(``dicomweb_servers``). With ``users`` its HTTP side (REST and DICOMweb)
asks for HTTP basic authentication; the tests' own REST calls then sign in
as the first user.

Orthanc binds every interface (it has no listen-address option) and refuses
instances without PatientID / Study / Series UIDs; ``TCP_NODELAY=1`` keeps
dcmtk's Nagle delay off its receiving side (NOTES).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

HOST = "127.0.0.1"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_binary() -> str | None:
    found = shutil.which("Orthanc")
    if found is None and os.access("/usr/sbin/Orthanc", os.X_OK):
        found = "/usr/sbin/Orthanc"
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Orthanc:
    home: Path
    binary: str
    ae_title: str = "ORTHANC"
    dicom_port: int = 0
    http_port: int = 0
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    dicomweb: bool = False
    users: dict[str, str] = field(default_factory=dict)  # HTTP basic: user -> password
    dicomweb_servers: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def configure(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or _free_port()
        self.http_port = self.http_port or _free_port()
        config = {
            "Name": "pacsnode-test-pacs",
            "StorageDirectory": str(self.home / "storage"),
            "IndexDirectory": str(self.home / "index"),
            "SyncStorageArea": True,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "RemoteAccessAllowed": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "DicomWeb": {
                "Enable": self.dicomweb,
                "Root": "/dicom-web/",
                "Servers": self.dicomweb_servers,
            },
            "StableAge": 3600,
        }
        (self.home / "config.json").write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 30.0) -> Orthanc:
        self.configure()
        log = open(self.home / "orthanc.log", "ab")  # noqa: SIM115 - kept by the process
        self.process = subprocess.Popen(
            [self.binary, str(self.home / "config.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not (self._http_up() and self._echo()):
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"Orthanc did not start in {timeout}s: {self.log()[-2000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        path = self.home / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _http_up(self) -> bool:
        try:
            return bool(self.get("/system"))
        except (OSError, ValueError):
            return False

    def _echo(self) -> bool:
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate(HOST, self.dicom_port, ae_title=self.ae_title)
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and status.Status == 0

    def request(self, path: str, method: str = "GET", body: Any = None) -> Any:
        """A REST call; ``body`` is sent as JSON, or as is when it is bytes."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        self._sign(req)
        with urllib.request.urlopen(req, timeout=120) as resp:
            payload = resp.read()
        return json.loads(payload) if payload else None

    def request_status(self, path: str, body: Any = None, method: str = "POST") -> int:
        """The HTTP status of a REST call that may fail (no exception for 4xx/5xx)."""
        try:
            self.request(path, method, body)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        return 200

    def _sign(self, req: urllib.request.Request) -> None:
        for user, password in list(self.users.items())[:1]:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")

    def get(self, path: str) -> Any:
        return self.request(path)

    def post(self, path: str, body: Any) -> Any:
        return self.request(path, "POST", body)

    # --- what tests ask of the PACS ---------------------------------------

    def upload(self, files: list[Path]) -> None:
        """Store files through the REST API (``POST /instances``)."""
        for path in files:
            req = urllib.request.Request(
                self.url + "/instances", data=path.read_bytes(), method="POST"
            )
            self._sign(req)
            with urllib.request.urlopen(req, timeout=60):
                pass

    def study_id(self, study_instance_uid: str) -> str | None:
        found = self.post("/tools/lookup", study_instance_uid.encode())
        for item in found or []:
            if item.get("Type") == "Study":
                return str(item["ID"])
        return None

    def series_of(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """The study's series with their main tags (empty if the study is unknown)."""
        study = self.study_id(study_instance_uid)
        if study is None:
            return []
        return list(self.get(f"/studies/{study}/series?expand"))

    def instances_of_modality(self, study_instance_uid: str, modality: str) -> list[str]:
        """Orthanc instance IDs of the study's series of ``modality``."""
        out: list[str] = []
        for series in self.series_of(study_instance_uid):
            if series["MainDicomTags"].get("Modality") == modality:
                out += list(series["Instances"])
        return out

    def file(self, instance_id: str) -> bytes:
        req = urllib.request.Request(f"{self.url}/instances/{instance_id}/file")
        self._sign(req)
        with urllib.request.urlopen(req, timeout=60) as resp:
            return bytes(resp.read())

    def count_instances(self) -> int:
        try:
            return int(self.get("/statistics")["CountInstances"])
        except (urllib.error.URLError, OSError):
            return -1
