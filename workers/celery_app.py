"""The Celery application shared by ``pacsnode serve`` and ``pacsnode worker``.

Broker: ``PACSNODE_BROKER_URL``, Redis (``redis://…``) or RabbitMQ
(``amqp://…``) for real deployments; empty means the embedded broker,
kombu's filesystem transport under ``<data_dir>/broker``: no server to run,
messages are files, so queued work survives a restart of the node; it serves
one machine (:func:`check_embedded_broker`). Whatever the broker, the database
is the source of truth (pacsnode.workers.dispatcher): a message the broker loses
is published again, and a job whose worker died is taken back when its lease
expires (:mod:`pacsnode.db.jobs`), whether or not the broker redelivers it.

Queues: ``cpu`` (load, preprocess, encode, export) and ``gpu`` (model
inference), so inference workers can run on GPU machines. Task names and
time limits: :mod:`pacsnode.core.taskdefs`.

The retry policy is here too: :func:`is_transient` is the one decision
whether a failed task is worth running again, and :data:`RETRY_OPTIONS` are
Celery's own ``max_retries``/``retry_backoff``/``retry_jitter`` every task
declares; :func:`retry_later` asks Celery for the next attempt with them.

A worker sends DICOM (exports), so its start-up installs the networking
patches (:func:`install_networking_patches`, on Celery's ``worker_init`` and
``worker_process_init``) and stops when pynetdicom is an untested release.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import Retry
from celery.utils.time import get_exponential_backoff_interval
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.exc import DBAPIError, OperationalError

from pacsnode.core.errors import ConfigError, PacsnodeError
from pacsnode.core.settings import Settings
from pacsnode.core.taskdefs import RUN_JOB
from pacsnode.scp import patches

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
# The embedded broker polls its folder this often (kombu's default is 1 s).
EMBEDDED_POLL_S = 0.05


# File systems on which the embedded broker's folder would be shared between
# machines: its locking and renames are not made for that.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs",
     "afs", "fuse.sshfs", "fuse.s3fs", "fuse.glusterfs", "fuse.cephfs", "virtiofs"}
)  # fmt: skip


def broker_options(settings: Settings) -> tuple[str, dict[str, object]]:
    if settings.broker_url.startswith(("amqp://", "amqps://")):
        # RabbitMQ gives an unacknowledged message back as soon as its
        # consumer's connection closes; its heartbeat (broker_heartbeat) notices
        # a consumer that vanished without closing it.
        return settings.broker_url, {}
    if settings.broker_url:
        # Redis: unacknowledged messages go back to the queue after this long; a
        # task never runs longer (its hard time limit is shorter). A dead worker's
        # job does not wait for it: its lease expires in seconds.
        return settings.broker_url, {"visibility_timeout": 3600}
    folder = settings.layout.broker
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return "filesystem://localhost/", {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
        "polling_interval": EMBEDDED_POLL_S,
    }


def _mount_type(path: Path, mounts: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind = "", ""
    target = str(path.resolve())
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def check_embedded_broker(settings: Settings, mounts: Path = Path("/proc/mounts")) -> str:
    """A worker about to use the embedded broker (no ``broker_url``): refuse
    a broker folder on a network file system (a worker on another machine),
    and return a warning when no node on this machine has made the folder
    yet ("" otherwise). The embedded broker serves one machine.

    Raises:
        ConfigError: the folder is on a network file system.
    """
    if settings.broker_url:
        return ""
    folder = settings.layout.broker
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    kind = _mount_type(existing, mounts) if mounts.exists() else ""
    if kind in NETWORK_FILESYSTEMS:
        raise ConfigError(
            f"broker_url is empty, so this worker would use the embedded broker in {folder}, "
            f"which is on a network file system ({kind}): the embedded broker serves one "
            "machine; give every worker and the node the same broker_url "
            "(redis://... or amqp://...)"
        )
    if not folder.exists():
        return (
            f"broker_url is empty and {folder} does not exist yet: this worker gets jobs only "
            "from a node on this machine with the same data_dir (the embedded broker serves "
            "one machine; elsewhere set broker_url to the node's Redis or RabbitMQ)"
        )
    return ""


def install_networking_patches(**_: object) -> None:
    """Celery signal receiver: :func:`scp.patches.install` in the worker
    (``worker_init``, before the pool starts) and in each pool process
    (``worker_process_init``; a no-op when forked from a patched parent).
    Celery logs and ignores exceptions of signal receivers, so a refused
    pynetdicom ends the worker here, with the reason on stderr (exit 2, as
    the CLI's configuration errors)."""
    try:
        patches.install()
    except ConfigError as exc:
        print(f"pacsnode: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def make_app(settings: Settings) -> Celery:
    broker, options = broker_options(settings)
    app = Celery("pacsnode", broker=broker, include=["pacsnode.workers.tasks"])
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in (CPU_QUEUE, GPU_QUEUE)
        ],
        task_default_queue=CPU_QUEUE,
        # At-least-once: acknowledge after the task ran; a worker that dies
        # mid-task gets its message redelivered (tasks are idempotent).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        # Defaults; each task declares its own (pacsnode.core.taskdefs).
        task_time_limit=RUN_JOB.time_limit_s,
        task_soft_time_limit=RUN_JOB.soft_time_limit_s,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    app.conf.pacsnode_settings = settings
    # Connected once however many apps are made (Celery keys receivers by id).
    signals.worker_init.connect(install_networking_patches, weak=False)
    signals.worker_process_init.connect(install_networking_patches, weak=False)
    return app


# Celery's own retry options, declared by every task: at most 5 retries, 1, 2,
# 4 … 60 s apart, each with full jitter (a random share of the interval), so
# workers that hit the same outage do not all come back at the same moment.
RETRY_OPTIONS: dict[str, Any] = {
    "max_retries": 5,
    "retry_backoff": 1,
    "retry_backoff_max": 60,
    "retry_jitter": True,
}


def is_transient(exc: BaseException) -> bool:
    """The one retry decision: worth trying again later? A pacsnode error
    says so itself (``transient``, :mod:`pacsnode.core.errors`: Out of
    Resources yes, bad geometry or undecodable pixels no); of the others, a
    database or broker that cannot be reached, a connection or a timeout."""
    if isinstance(exc, PacsnodeError):
        return exc.transient
    if isinstance(exc, OperationalError | KombuOperationalError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        return bool(exc.connection_invalidated)
    return False


def may_retry(task: Task, exc: BaseException) -> bool:
    """Transient, and the task has retries left."""
    return is_transient(exc) and task.request.retries < task.max_retries


def retry_later(task: Task, exc: BaseException) -> Retry:
    """The Retry to raise: the task runs again after Celery's exponential
    backoff with the task's own ``retry_backoff``, ``retry_backoff_max`` and
    ``retry_jitter`` (the computation Celery's ``autoretry_for`` does)."""
    countdown = get_exponential_backoff_interval(
        factor=int(task.retry_backoff),
        retries=task.request.retries,
        maximum=task.retry_backoff_max,
        full_jitter=task.retry_jitter,
    )
    return task.retry(exc=exc, countdown=countdown)
