"""Fault scenarios that need a server of their own: PostgreSQL restarted while
a job runs (a private cluster in a temporary folder, on a free port).

The other scenarios of the fault suite (``-m faults``) live beside the
features they break: the worker and its pool process SIGKILLed during
inference (embedded broker, Redis and RabbitMQ: the job resumes once its
lease expires) and Redis restarted during ingest in ``test_pipeline.py``,
SCP SIGKILL mid-association and the disk watermark in
``test_policy_and_faults.py``, a destination down in
``test_exports.py`` and ``test_results_orthanc.py``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faultreport import ledger, lost_and_duplicated, sop_uids
from tests.support import IN_CI, Node, free_port, node_config, storescu, wait_for
from tests.test_assembly import FAST, jobs
from tests.test_pipeline import finished


def _pg_bin() -> Path:
    """The newest installed PostgreSQL server's binaries (Debian layout)."""
    if "PACSNODE_TEST_PG_BIN" in os.environ:
        return Path(os.environ["PACSNODE_TEST_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


@dataclass
class PrivatePostgres:
    """A throw-away PostgreSQL cluster. PostgreSQL refuses to run as root, so
    as root the cluster belongs to (and runs as) the ``postgres`` user."""

    folder: Path
    port: int

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        result = subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=120, cwd=self.folder
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def init(self) -> None:
        self._run(
            str(PG_BIN / "initdb"), "-D", str(self.folder / "data"), "-A", "trust",
            "-U", "postgres", "--no-sync", "-E", "UTF8",
        )  # fmt: skip

    def ctl(self, action: str) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off "
            "-c max_connections=200"
        )
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.folder / "data"), "-l",
            str(self.folder / "server.log"), "-o", options, "-w", "-m", "fast", action,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists():
        message = f"PostgreSQL server binaries not found in {PG_BIN}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    folder = Path(tempfile.mkdtemp(prefix="pacsnode-pg-"))
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    server = PrivatePostgres(folder, free_port())
    server.init()
    server.ctl("start")
    try:
        yield server
    finally:
        subprocess.run(
            ["runuser", "-u", "postgres", "--"] * (os.geteuid() == 0)
            + [str(PG_BIN / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.faults
# The database_url fixture is not used: the node's database is the private cluster.
@pytest.mark.parametrize(
    "database_url", [pytest.param("sqlite", id="private-postgresql")], indirect=True
)
def test_postgres_restarted_during_a_job(
    make_node: Any, private_postgres: PrivatePostgres, tmp_path: Path, fault_report: Any
) -> None:
    started = time.monotonic()
    node: Node = make_node(
        config=node_config(
            completion=FAST, disabled_models=["ct-lesion-sequence", "ct-lesion-segmenter"]
        )
    )
    node.database_url = private_postgres.url
    node.start()
    from pacsnode.lab.phantom import SeriesSpec, write_ct_series

    for k in range(2):
        folder = tmp_path / "in" / f"s{k}"
        write_ct_series(folder, SeriesSpec(slices=24, rows=96, columns=96, seed=40 + k))
        storescu(node, folder)
    wait_for(
        lambda: any(j.state == "running" for j in jobs(node)), timeout=60, what="a job running"
    )
    private_postgres.ctl("restart")  # every open connection is cut
    done = wait_for(lambda: finished(node, 2), timeout=150, what="both jobs after the restart")
    assert [j.state for j in done] == ["succeeded", "succeeded"], [j.error for j in done]
    # More studies after the restart are stored and processed too.
    write_ct_series(tmp_path / "in" / "s2", SeriesSpec(slices=8, rows=64, columns=64, seed=42))
    storescu(node, tmp_path / "in" / "s2")
    done = wait_for(lambda: finished(node, 3), timeout=120, what="the third job")
    book = ledger(node.database_url)
    sent = sop_uids(tmp_path / "in")
    lost, duplicated = lost_and_duplicated(sent, book.instances)
    fault_report(
        "PostgreSQL restarted during a job",
        sent=len(sent),
        acked=len(sent),
        stored=len(sent & set(book.instances)),
        jobs=book.jobs,
        results=book.results,
        lost=lost + 3 - book.job_states["succeeded"],
        duplicated=duplicated + book.result_duplicates + book.job_duplicates,
        seconds=time.monotonic() - started,
    )
