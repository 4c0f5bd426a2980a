"""Broker choice: the URLs the settings accept, what Celery is told for
RabbitMQ, and the embedded broker staying on one machine. The brokers at
work (a job through each, a worker killed under each) are in
``test_pipeline.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pacsnode.core.errors import ConfigError
from pacsnode.core.settings import Settings
from pacsnode.core.taskdefs import INFER_JOB, RUN_JOB
from pacsnode.workers.celery_app import broker_options, check_embedded_broker, make_app


@pytest.mark.parametrize(
    "url", ["", "redis://127.0.0.1:6379/0", "amqp://guest:guest@127.0.0.1:5672//"]
)
def test_settings_accept_the_embedded_broker_redis_and_rabbitmq(url: str, tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path, broker_url=url).broker_url == url


def test_an_unknown_broker_is_refused_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(data_dir=tmp_path, broker_url="kafka://127.0.0.1:9092")
    message = str(caught.value)
    assert "broker_url" in message and "amqp://" in message and "embedded broker" in message


def test_rabbitmq_acknowledges_late_one_message_at_a_time(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_url="amqp://guest:guest@127.0.0.1:5672//")
    app = make_app(settings)
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    # Redis' visibility timeout means nothing to RabbitMQ, which gives a
    # message back when its consumer's connection closes.
    assert broker_options(settings) == (settings.broker_url, {})
    # The AMQP heartbeat notices a consumer gone without closing its connection.
    assert 0 < app.conf.broker_heartbeat <= 120
    assert app.conf.task_time_limit == RUN_JOB.time_limit_s >= INFER_JOB.soft_time_limit_s


def _mounts(tmp_path: Path, kind: str) -> Path:
    mounts = tmp_path / "mounts"
    (tmp_path / "shared").mkdir(exist_ok=True)  # the mount point
    mounts.write_text(
        "proc /proc proc rw 0 0\n"
        "/dev/sda1 / ext4 rw,relatime 0 0\n"
        f"server:/export {tmp_path / 'shared'} {kind} rw,relatime 0 0\n"
    )
    return mounts


def test_a_worker_on_another_machine_cannot_use_the_embedded_broker(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "shared" / "pacsnode")
    with pytest.raises(ConfigError) as caught:
        check_embedded_broker(settings, _mounts(tmp_path, "nfs4"))
    message = str(caught.value)
    assert "network file system (nfs4)" in message and "serves one machine" in message
    assert "broker_url" in message
    # With a broker URL the folder does not matter.
    remote = Settings(data_dir=tmp_path / "shared", broker_url="redis://10.0.0.1:6379/0")
    assert check_embedded_broker(remote, _mounts(tmp_path, "nfs4")) == ""


def test_a_worker_without_a_node_on_this_machine_is_told_so(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "shared" / "pacsnode")
    warning = check_embedded_broker(settings, _mounts(tmp_path, "ext4"))
    assert "does not exist yet" in warning and "serves one machine" in warning
    settings.layout.broker.mkdir(parents=True)  # a node on this machine made it
    assert check_embedded_broker(settings, _mounts(tmp_path, "ext4")) == ""
