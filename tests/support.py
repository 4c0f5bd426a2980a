"""Helpers shared by the tests: a real ``pacsnode serve`` process, dcmtk, deadlines."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_binary(name: str) -> str:
    """Path of a command-line tool; fail under CI=true, skip elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install dcmtk dicom3tools orthanc)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for peers that cannot report their own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_pids(pid: int) -> list[int]:
    """Process IDs whose parent is ``pid`` (from /proc; Linux only)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@dataclass
class Node:
    """A ``pacsnode serve`` subprocess on a free port."""

    data_dir: Path
    database_url: str
    config: dict[str, Any]
    env_extra: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None
    port: int = 0
    api_url: str = ""
    ae_title: str = "PACSNODE"
    output: list[str] = field(default_factory=list)
    serve_args: list[str] = field(default_factory=list)  # e.g. ["--no-worker"]

    def env(self) -> dict[str, str]:
        config_path = self.data_dir.parent / f"{self.data_dir.name}.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        env = {
            **os.environ,
            "PACSNODE_CONFIG": str(config_path),
            "PACSNODE_DATA_DIR": str(self.data_dir),
            "PACSNODE_DATABASE_URL": self.database_url,
            "PACSNODE_DICOM_HOST": "127.0.0.1",
            "PACSNODE_DICOM_PORT": "0",
            "PACSNODE_HTTP_PORT": "0",
            "PACSNODE_AE_TITLE": self.ae_title,
            **self.env_extra,
        }
        return env

    def start(self, timeout: float = 60.0) -> Node:
        self.output = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pacsnode", "serve", *self.serve_args],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                if line.startswith("pacsnode api:"):
                    self.api_url = line.split(":", 1)[1].strip()
                if line.startswith("pacsnode ready:"):
                    self.port = int(line.rsplit(":", 1)[1])
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or not self.port:
            self.stop()
            raise RuntimeError("pacsnode serve did not start:\n" + "".join(self.output))
        return self

    def log(self) -> str:
        return "".join(self.output)

    def kill9(self) -> None:
        """SIGKILL the supervisor; its SCP processes die with it (PR_SET_PDEATHSIG)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pacsnode", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )


def node_config(peers: list[dict[str, Any]] | None = None, **settings: Any) -> dict[str, Any]:
    default_peers = [
        {"ae_title": ae, "hosts": ["127.0.0.1"]} for ae in ("STORESCU", "ECHOSCU", "TESTSCU")
    ]
    return {"peers": default_peers if peers is None else peers, **settings}


def storescu(node: Node, folder: Path) -> None:
    """Send every file below ``folder`` to ``node`` with dcmtk's storescu."""
    result = subprocess.run(
        [
            require_binary("storescu"),
            "-aec",
            "PACSNODE",
            "+sd",
            "127.0.0.1",
            str(node.port),
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
