"""A pacsnode serve for the benchmarks: start one, wait for its jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pacsnode.db.models import Job
from pacsnode.db.session import create_db_engine


def start_node(
    tmp: Path,
    broker_url: str,
    debounce: float,
    extra_env: dict[str, str] | None = None,
    extra_config: str = "",
) -> tuple[subprocess.Popen[str], int]:
    """``pacsnode serve`` on a free port with its data under ``tmp``; its log
    goes to ``tmp/pacsnode.log``. ``extra_config`` is YAML appended to the
    configuration (more settings; its ``peers`` replace STORESCU's).
    Returns the process and the DICOM port."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "pacsnode.yaml"
    peers = (
        ""
        if "peers:" in extra_config
        else ("peers:\n  - ae_title: STORESCU\n    hosts: [127.0.0.1]\n")
    )
    config.write_text(
        peers
        + f"completion: {{debounce_s: {debounce}, quiet_period_s: 30, max_wait_s: 900}}\n"
        + extra_config
    )
    env = {
        **os.environ,
        "PACSNODE_CONFIG": str(config),
        "PACSNODE_DATA_DIR": str(tmp / "data"),
        "PACSNODE_DICOM_HOST": "127.0.0.1",
        "PACSNODE_DICOM_PORT": "0",
        "PACSNODE_BROKER_URL": broker_url,
        **(extra_env or {}),
    }
    log = (tmp / "pacsnode.log").open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacsnode", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("pacsnode ready:"):
            return proc, int(line.rsplit(":", 1)[1])
    raise RuntimeError(f"pacsnode did not start; see {tmp / 'pacsnode.log'}")


def utc(value: datetime) -> datetime:
    """SQLite gives naive datetimes; pacsnode writes UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def wait_job(db_url: str, job_count: int, deadline_s: float = 300) -> Any:
    """The newest job once there are ``job_count`` jobs and it has finished."""
    engine = create_db_engine(db_url)
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                jobs = conn.execute(select(Job).order_by(Job.id)).all()
            if len(jobs) >= job_count and jobs[-1].state in ("succeeded", "failed"):
                return jobs[-1]
            time.sleep(0.02)  # poll interval, not a synchronisation delay
    finally:
        engine.dispose()
    raise RuntimeError(f"job {job_count} did not finish in {deadline_s} s")
