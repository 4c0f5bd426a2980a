"""The Celery application shared by ``pacsnode serve`` and ``pacsnode worker``.

Broker: ``PACSNODE_BROKER_URL`` (``redis://…`` for real deployments); empty
means the embedded broker, kombu's filesystem transport under
``<data_dir>/broker``: no server to run, messages are files, so queued work
survives a restart of the node. Either way the database outbox is the source
of truth (pacsnode.workers.dispatcher), so a message the broker loses is published
again.

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


def broker_options(settings: Settings) -> tuple[str, dict[str, object]]:
    if settings.broker_url:
        # Unacknowledged messages go back to the queue after this long; a task
        # never runs longer (its hard time limit is shorter).
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
