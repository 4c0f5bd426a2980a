"""``pacsnode serve``: the all-in-one node on one machine.

Start-up order: check the configuration (done by the caller), install the
DICOM networking patches (refused for an untested pynetdicom), check the
installed models (manifests and weights hashes), bring the database schema to
head, then run the storage SCP processes, the study assembler, the dispatcher
and a Celery worker (both queues), each in its own process under one
supervisor. Dedicated workers elsewhere run
``pacsnode worker``. The admin API (``pacsnode.api``) runs as one more
supervised process, on ``api.host``:``http_port``.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

from pacsnode.apiserver import bind_api, run_api
from pacsnode.core.errors import ConfigError
from pacsnode.core.logs import configure_logging
from pacsnode.core.settings import Settings
from pacsnode.db.migrate import upgrade
from pacsnode.db.session import create_db_engine
from pacsnode.firstrun import issue_link, needs_link, next_steps
from pacsnode.scp import patches
from pacsnode.scp.server import SCPSupervisor, Service
from pacsnode.viewerfiles import installed as viewer_installed
from pacsnode.viewerfiles import missing_message as viewer_missing
from pacsnode.workers.assembler import run_assembler

if TYPE_CHECKING:
    from pacsnode.models.registry import Registry

log = logging.getLogger("pacsnode.serve")


def assembler_service(settings: Settings, stop: threading.Event) -> None:
    engine = create_db_engine(settings.effective_database_url)
    run_assembler(engine, settings, stop)
    engine.dispose()


def dispatcher_service(settings: Settings, stop: threading.Event) -> None:
    from pacsnode.workers.celery_app import make_app
    from pacsnode.workers.dispatcher import run_dispatcher

    engine = create_db_engine(settings.effective_database_url)
    run_dispatcher(engine, make_app(settings), stop)
    engine.dispose()


def worker_argv(queues: str, concurrency: int, log_level: str) -> list[str]:
    return [
        "worker",
        f"--queues={queues}",
        f"--concurrency={concurrency}",
        f"--loglevel={log_level}",
        "--hostname=pacsnode@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


WORKER_NICE = 10


def yield_to_receiver() -> None:
    """On the host of the SCP, the embedded worker (and the pool processes it
    forks, which inherit both) runs at a lower CPU priority and leaves a core
    to the receiver: TensorFlow gets cores - 1 compute threads unless
    ``PACSNODE_TF_THREADS`` says otherwise. A scanner must never time out
    because a model is busy."""
    os.nice(WORKER_NICE)
    os.environ.setdefault("PACSNODE_TF_THREADS", str(max(1, (os.cpu_count() or 1) - 1)))


def worker_service(settings: Settings, stop: threading.Event) -> None:
    """A Celery worker for both queues; it handles SIGTERM itself (warm
    shutdown: the running task finishes, unstarted ones stay queued)."""
    # Until Celery installs its own handler it holds no task: a stop request
    # during start-up (imports take seconds) ends the process at once.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if stop.is_set():
        return
    yield_to_receiver()
    from pacsnode.workers.celery_app import CPU_QUEUE, GPU_QUEUE
    from pacsnode.workers.tasks import app

    # --quiet: no start-up banner, so the node's next steps stay in view.
    quiet = [] if settings.log_level.upper() == "DEBUG" else ["--quiet"]
    app.worker_main(argv=[*quiet, *worker_argv(f"{CPU_QUEUE},{GPU_QUEUE}", 1, settings.log_level)])


def check_models(settings: Settings) -> Registry:
    """Load the model registry before anything starts: a bad manifest or a
    weights file that does not match its hash stops the node here, with the
    file named, instead of failing jobs later. Imported lazily: reading
    manifests pulls in the preprocessing module (numpy, scipy)."""
    from pacsnode.models.registry import Registry

    registry = Registry.load(settings.models_dir, settings.disabled_models)
    log.info(
        "models: %d installed, %d enabled, from %s",
        len(registry.models),
        len(registry.enabled),
        settings.models_dir,
    )
    return registry


def first_hour(settings: Settings, dicom_port: int, api_url: str) -> list[str]:
    """The next steps for the person who started the node, with a one-time
    dashboard login link on a local first run (:mod:`pacsnode.firstrun`)."""
    engine = create_db_engine(settings.effective_database_url)
    try:
        link = issue_link(settings, engine, api_url) if needs_link(settings, engine) else None
    finally:
        engine.dispose()
    if viewer_installed(settings):
        more = [("Open a study in the OHIF viewer", f"{api_url}/viewer/")]
    else:
        log.warning("%s", viewer_missing(settings))
        more = [("Viewer", viewer_missing(settings))]
    return next_steps(settings, dicom_port, api_url, link, more)


def serve(settings: Settings, embedded_worker: bool = True) -> int:
    """Run the node until SIGTERM/SIGINT. Without ``embedded_worker`` the
    node runs no Celery worker of its own: dedicated ``pacsnode worker``
    processes (other containers or machines) take its jobs."""
    configure_logging(settings.log_level, "main", settings.log_format)
    try:
        # Before anything forks: every process of the node inherits them.
        patches.install()
        check_models(settings)
    except ConfigError as exc:
        # Same form and exit status as the CLI's configuration errors.
        print(f"pacsnode: {exc}", file=sys.stderr, flush=True)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(settings.effective_database_url)
    revision = upgrade(engine)
    engine.dispose()
    log.info("database ready at revision %s", revision)
    if not settings.peers:
        log.warning("no peers configured: every association will be rejected (default-deny)")
    # Bound here, before the services fork, so the port is known (and taken) at once.
    try:
        api_socket = bind_api(settings)
    except OSError as exc:
        where = f"{settings.api.host}:{settings.http_port}"
        print(f"pacsnode: api.host/http_port: cannot listen on {where}: {exc.strerror}",
              file=sys.stderr, flush=True)  # fmt: skip
        return 2
    services: list[tuple[str, Service]] = [
        ("assembler", assembler_service),
        ("dispatcher", dispatcher_service),
        ("api", functools.partial(run_api, sock=api_socket)),
    ]
    if embedded_worker:
        services.append(("worker", worker_service))
    elif not settings.broker_url:
        log.warning("no embedded worker and no broker_url: only workers on this machine get jobs")
    supervisor = SCPSupervisor(settings, services=services)
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stop())
    # One machine-readable line on stdout: tests and scripts wait for it.
    address = f"{settings.ae_title}@{settings.dicom_host}:{supervisor.port}"
    api_host, api_port = api_socket.getsockname()[:2]
    api_url = f"http://{api_host}:{api_port}"
    print(f"pacsnode api: {api_url}", flush=True)
    print(f"pacsnode ready: {address}", flush=True)
    print("\n".join(first_hour(settings, supervisor.port, api_url)), flush=True)
    supervisor.run()
    log.info("pacsnode stopped")
    return 0
