"""Arrival to finished job through a real broker and a real Celery worker.

Each test runs with the embedded broker (files under the data folder), with
Redis (PACSNODE_TEST_REDIS_URL, default 127.0.0.1:6379, a database of its own
that is flushed first) and with RabbitMQ (PACSNODE_TEST_RABBITMQ_URL, default
amqp://guest:guest@127.0.0.1:5672, a virtual host of its own made with
rabbitmqctl and deleted afterwards).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from pacsnode.lab.phantom import SeriesSpec, ct_series_datasets, write_ct_series
from tests.faultreport import ledger, lost_and_duplicated, sop_uids
from tests.support import (
    IN_CI,
    Node,
    child_pids,
    free_port,
    node_config,
    require_binary,
    storescu,
    wait_for,
)
from tests.test_assembly import FAST, jobs

NO_MODELS = ["ct-lesion-classifier", "ct-lesion-segmenter", "ct-lesion-sequence", "ct-ood-gate"]
REDIS_URL = os.environ.get("PACSNODE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
RABBITMQ_URL = os.environ.get("PACSNODE_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")


def rabbitmq_vhost() -> Iterator[str]:
    """A RabbitMQ virtual host of its own for one test (guest may use it); deleted after."""
    vhost = f"pacsnode-test-{uuid.uuid4().hex[:10]}"
    ctl = require_binary("rabbitmqctl")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ctl, "-q", *argv], capture_output=True, text=True, timeout=60)

    made = run("add_vhost", vhost)
    if made.returncode == 0:
        made = run("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    if made.returncode != 0:
        message = f"RabbitMQ (rabbitmqctl add_vhost) is required: {made.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield f"{RABBITMQ_URL}/{vhost}"
    finally:
        run("delete_vhost", vhost)


@pytest.fixture(params=["embedded", "redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "embedded":
        yield ""
        return
    if request.param == "rabbitmq":
        yield from rabbitmq_vhost()
        return
    url = f"{REDIS_URL}/{random.randint(1, 15)}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        if IN_CI:
            pytest.fail(f"Redis at {REDIS_URL} is required under CI: {exc}")
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    yield url
    client.flushdb()


@pytest.fixture
def pipeline_node(make_node, broker_url: str) -> Node:  # type: ignore[no-untyped-def]
    return make_node(
        config=node_config(completion=FAST), env_extra={"PACSNODE_BROKER_URL": broker_url}
    ).start()


def finished(node: Node, count: int) -> list[Any] | None:
    found = jobs(node)
    done = [j for j in found if j.state in ("succeeded", "failed")]
    return found if len(found) == count and len(done) == count else None


def test_study_runs_to_succeeded(pipeline_node: Node, tmp_path: Path) -> None:
    write_ct_series(tmp_path / "ct", SeriesSpec(slices=12, rows=64, columns=64, seed=11))
    storescu(pipeline_node, tmp_path / "ct")
    (job,) = wait_for(lambda: finished(pipeline_node, 1), timeout=60, what="job to finish")
    assert (job.state, job.error, job.attempts) == ("succeeded", "", 1)
    assert job.queued_at is not None and job.started_at is not None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_geometry_fails_the_job_with_its_reason(pipeline_node: Node, tmp_path: Path) -> None:
    datasets = ct_series_datasets(SeriesSpec(slices=6, rows=32, columns=32, seed=12))
    datasets[3].ImagePositionPatient = list(datasets[2].ImagePositionPatient)  # duplicate
    folder = tmp_path / "dup"
    folder.mkdir()
    for k, ds in enumerate(datasets):
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
    storescu(pipeline_node, folder)
    (job,) = wait_for(lambda: finished(pipeline_node, 1), timeout=60, what="job to finish")
    assert job.state == "failed"
    assert "duplicate" in job.error.lower()
    assert datasets[0].SeriesInstanceUID in job.error
    assert "Phantom" not in job.error and "PHANTOM-0001" not in job.error


@pytest.mark.faults
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_worker_killed_during_inference_resumes_in_seconds_and_completes_once(
    pipeline_node: Node, broker_url: str, tmp_path: Path, fault_report: Any
) -> None:
    """The worker process and its pool child SIGKILLed mid-inference (as the
    OOM killer would): the job's lease expires, the dispatcher publishes it
    again, and it completes once, whatever the broker does with the message
    it had handed out (embedded: forgotten; Redis: back after an hour;
    RabbitMQ: back at once, and dropped as stale)."""
    started = time.monotonic()
    write_ct_series(tmp_path / "ct", SeriesSpec(slices=40, rows=128, columns=128, seed=13))
    storescu(pipeline_node, tmp_path / "ct")
    # The models' task (gpu queue) has started: loading TensorFlow and the
    # models alone takes seconds, so the kill lands inside inference.
    wait_for(
        lambda: "models' task started (gpu queue)" in pipeline_node.log(),
        timeout=90,
        what="the inference task to start",
    )
    assert pipeline_node.process is not None
    # serve → worker service (Celery's main process) → its pool process, which runs the task.
    (worker,) = [c for c in child_pids(pipeline_node.process.pid) if child_pids(c)]
    (pool,) = child_pids(worker)
    # The job's lease names the process running it (pacsnode jobs, the API).
    listed = pipeline_node.cli("jobs", "--json")
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["state"] == "running" and row["lease_owner"].endswith(f" pid {pool}"), row
    killed_at = datetime.now(UTC)
    os.kill(worker, signal.SIGKILL)
    os.kill(pool, signal.SIGKILL)
    (job,) = wait_for(lambda: finished(pipeline_node, 1), timeout=180, what="job to finish")
    assert (job.state, job.error) == ("succeeded", "")
    assert job.attempts == 2  # the killed run and the one after its lease expired
    resumed_s = (_utc(job.started_at) - killed_at).total_seconds()
    done_s = (_utc(job.finished_at) - killed_at).total_seconds()
    print(f"\n[{broker_url.split(':')[0] or 'embedded'}] worker killed: resumed after "
          f"{resumed_s:.1f} s, succeeded after {done_s:.1f} s")  # fmt: skip
    assert 0 < resumed_s <= 30, resumed_s
    assert "lost (lease expired): 1 requeued" in pipeline_node.log()
    if broker_url.startswith("amqp"):  # RabbitMQ gave the message back: dropped as stale
        assert "stale or duplicate message" in pipeline_node.log()
    book = ledger(pipeline_node.database_url)
    assert book.results > 0
    sent = sop_uids(tmp_path / "ct")
    lost, duplicated = lost_and_duplicated(sent, book.instances)
    fault_report(
        "worker and pool SIGKILL during inference",
        sent=len(sent),
        acked=len(sent),
        stored=len(sent & set(book.instances)),
        jobs=book.jobs,
        results=book.results,
        lost=lost + (1 - book.job_states["succeeded"]),
        duplicated=duplicated + book.result_duplicates + book.job_duplicates,
        seconds=time.monotonic() - started,
        resumed_s=resumed_s,
    )


def _utc(value: datetime) -> datetime:
    """SQLite gives back naive datetimes (stored as UTC)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[dict[str, Any]]:
    exe = require_binary("redis-server")
    port = free_port()
    state: dict[str, Any] = {"port": port, "proc": None}

    def start() -> None:
        state["proc"] = subprocess.Popen(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=port)
        wait_for(lambda: _ping(client), what="private redis")

    def stop() -> None:
        state["proc"].terminate()
        state["proc"].wait(timeout=10)

    state["start"], state["stop"] = start, stop
    start()
    yield state
    if state["proc"].poll() is None:
        stop()


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.mark.faults
def test_broker_restarted_while_studies_arrive(
    make_node, private_redis: dict[str, Any], tmp_path: Path, fault_report: Any
) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    url = f"redis://127.0.0.1:{private_redis['port']}/0"
    # No models: the fault is in dispatching jobs, and each would cost seconds of inference.
    config = node_config(completion=FAST, disabled_models=NO_MODELS)
    node = make_node(config=config, env_extra={"PACSNODE_BROKER_URL": url}).start()

    def send(k: int) -> None:
        folder = tmp_path / "in" / f"s{k}"
        write_ct_series(folder, SeriesSpec(slices=4, rows=32, columns=32, seed=20 + k))
        storescu(node, folder)

    send(0)
    wait_for(lambda: finished(node, 1), timeout=60, what="the first job, Redis up")
    private_redis["stop"]()  # Redis goes away in the middle of the ingest
    for k in (1, 2):
        send(k)  # still acknowledged: storing needs no broker
    pending = wait_for(
        lambda: (j := jobs(node)) and len(j) == 3 and j, timeout=30, what="three jobs"
    )
    assert [j.state for j in pending[1:]] == ["pending", "pending"]
    private_redis["start"]()  # empty: the outbox republishes what it holds
    send(3)
    done = wait_for(lambda: finished(node, 4), timeout=90, what="all jobs after Redis is back")
    assert [(j.state, j.attempts) for j in done] == [("succeeded", 1)] * 4
    book = ledger(node.database_url)
    sent = sop_uids(tmp_path / "in")
    lost, duplicated = lost_and_duplicated(sent, book.instances)
    fault_report(
        "Redis restarted during ingest",
        sent=len(sent),
        acked=len(sent),
        stored=len(sent & set(book.instances)),
        jobs=book.jobs,
        results=book.results,
        lost=lost + 4 - book.job_states["succeeded"],
        duplicated=duplicated + book.result_duplicates + book.job_duplicates,
        seconds=time.monotonic() - started,
    )


@pytest.mark.faults
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("broker_url", ["embedded"], indirect=True)
def test_a_worker_that_comes_back_after_its_lease_was_taken_commits_nothing(
    pipeline_node: Node, tmp_path: Path, fault_report: Any
) -> None:
    """The process running a job is stopped (SIGSTOP: a paused VM, a swap
    storm) until its lease expires; a second worker runs the job to the end;
    then the first one continues: it finds its lease gone, stops, and the
    finished job and its results stay as the second attempt wrote them."""
    started = time.monotonic()
    log_path = tmp_path / "second-worker.log"
    with log_path.open("w") as log_file:
        second = subprocess.Popen(
            [sys.executable, "-m", "pacsnode", "worker", "--queues", "cpu,gpu"],
            env=pipeline_node.env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        write_ct_series(tmp_path / "ct", SeriesSpec(slices=40, rows=128, columns=128, seed=14))
        storescu(pipeline_node, tmp_path / "ct")

        def logs() -> str:
            return pipeline_node.log() + log_path.read_text()

        wait_for(lambda: "models' task started (gpu queue)" in logs(), timeout=120,
                 what="the inference task to start")  # fmt: skip
        (job,) = jobs(pipeline_node)
        zombie = int(job.lease_owner.rsplit(" ", 1)[1])  # "host pid N": the pool process
        os.kill(zombie, signal.SIGSTOP)
        try:
            (done,) = wait_for(lambda: finished(pipeline_node, 1), timeout=180,
                               what="the other worker to finish the job")  # fmt: skip
        except TimeoutError:
            raise AssertionError(f"{jobs(pipeline_node)}\n{logs()[-6000:]}") from None
        finally:
            os.kill(zombie, signal.SIGCONT)
        assert (done.state, done.attempts) == ("succeeded", 2)
        book_before = ledger(pipeline_node.database_url)
        wait_for(lambda: "lease lost" in logs(), timeout=60, what="the zombie to notice")
        # It stops at its next check; give it the time of a stage to misbehave.
        wait_for(lambda: "this run's work is dropped" in logs() or "lease lost at the end"
                 in logs() or "lease lost before" in logs(), timeout=60,
                 what="the zombie to drop its work")  # fmt: skip
        (after,) = jobs(pipeline_node)
        assert (after.state, after.attempts, after.finished_at, after.fence) == (
            "succeeded", 2, done.finished_at, done.fence,
        )  # fmt: skip
        book = ledger(pipeline_node.database_url)
        assert book.results == book_before.results > 0
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(timeout=30)
    sent = sop_uids(tmp_path / "ct")
    lost, duplicated = lost_and_duplicated(sent, book.instances)
    fault_report(
        "worker paused past its lease, then back",
        sent=len(sent),
        acked=len(sent),
        stored=len(sent & set(book.instances)),
        jobs=book.jobs,
        results=book.results,
        lost=lost + (1 - book.job_states["succeeded"]),
        duplicated=duplicated + book.result_duplicates + book.job_duplicates,
        seconds=time.monotonic() - started,
    )
