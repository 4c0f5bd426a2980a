"""The DICOM SCP (storage, verification, query/retrieve): one listening
socket served by several processes.

One Python process uses one core, and pynetdicom decodes PDUs in Python, so
the node pre-forks ``scp_processes`` workers (default: one per core) that all
accept on the same listening socket, bound once by the parent. Each worker
runs a threaded pynetdicom server with its own database engine, spool handle
and group-commit index writer. The parent only supervises: it restarts a
worker that dies and stops them all on SIGTERM/SIGINT.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydicom import config as pydicom_config
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    DEFAULT_TRANSFER_SYNTAXES,
    StoragePresentationContexts,
    _config,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacsnode.core.settings import Settings
from pacsnode.core.tls import server_context
from pacsnode.db.session import create_db_engine
from pacsnode.scp import patches
from pacsnode.scp.handlers import handlers
from pacsnode.scp.indexer import GroupCommitIndexer
from pacsnode.scp.patches import Contexts, PreboundServer, RequestHandler
from pacsnode.scp.policy import AssociationGate
from pacsnode.scp.retrieve import query_retrieve_handlers
from pacsnode.scp.spool import Spool

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


QUERY_RETRIEVE_SOP_CLASSES = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    for context in StoragePresentationContexts:
        # Both roles, so a peer may send (the default roles) and, proposing
        # the SCP role by role selection (PS3.7 D.3.3.4), receive the C-STOREs
        # of its C-GET over the same association. A peer that proposes no
        # role selection keeps the default roles.
        ae.add_supported_context(
            str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
        )
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for sop_class in QUERY_RETRIEVE_SOP_CLASSES:
        ae.add_supported_context(sop_class, DEFAULT_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.maximum_associations = settings.max_associations
    ae.network_timeout = settings.network_timeout_s
    ae.acse_timeout = 30
    ae.dimse_timeout = settings.network_timeout_s
    return ae


def bind_listener(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.dicom_host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((settings.dicom_host, settings.dicom_port))
    listener.listen(128)
    listener.setblocking(False)
    return listener


def run_worker(
    settings: Settings,
    listener: socket.socket,
    live_counts: Any,
    slot: int,
    stop: threading.Event | None = None,
) -> None:
    """Serve associations on ``listener`` until ``stop`` is set or SIGTERM.

    Raises :class:`~pacsnode.core.errors.ConfigError` for an untested
    pynetdicom (:func:`scp.patches.install`; ``serve`` checks it first)."""
    # C-MOVE and C-GET sub-operations send C-STOREs: the reactor checkpoint.
    patches.install()
    engine = create_db_engine(settings.effective_database_url, pool_size=2, max_overflow=4)
    indexer = GroupCommitIndexer(
        engine, grouping_for=lambda ae_title: settings.completion_for(ae_title).grouping
    )
    spool = Spool(settings.spool_dir, settings.min_free_disk_mb * 2**20)
    # Received data sets stream to a file as their PDUs arrive, in the spool's
    # incoming folder: no copy in memory, and storing one is a rename. Both
    # settings are process-wide, which is why SCP processes serve nothing else.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom's default handlers format a log record for every PDU and
    # DIMSE message even when nobody prints them; pacsnode logs its own.
    _config.LOG_HANDLER_LEVEL = "none"
    # Identifiers hold patient names and IDs: never let pynetdicom log them.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    tempfile.tempdir = str(spool.incoming)
    # Lenient in: odd values are stored as received; the checks the node
    # relies on (UIDs) are its own.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    gate = AssociationGate(settings, live_counts, slot)
    ae = build_ae(settings)
    server = PreboundServer(
        listener,
        ae,
        listener.getsockname()[:2],
        settings.ae_title,
        Contexts(ae.supported_contexts),
        ssl_context=server_context(settings.tls) if settings.tls else None,
        evt_handlers=handlers(spool, indexer, gate) + query_retrieve_handlers(engine, settings),
        request_handler=RequestHandler,
    )
    server.register()
    patches.freeze_heap()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
    )
    thread.start()
    stop.wait()
    server.shutdown()  # stops accepting; live associations finish or time out
    for assoc in server.active_associations:
        assoc.join(timeout=settings.network_timeout_s)
    indexer.close()
    engine.dispose()


def _die_with_parent() -> None:
    """Linux: receive SIGKILL when the supervising parent dies, so no orphan
    keeps accepting (and acknowledging) on the node's port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _child_stop_event() -> threading.Event:
    """In a freshly forked child: SIGTERM/SIGINT set the returned event.

    The supervisor forks with these signals blocked (see ``_spawn``), so a
    stop request that arrives before this runs is held, not lost to the
    parent's inherited handler, and is delivered here once unblocked."""
    stop = threading.Event()
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda *_: stop.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    return stop


def _worker_main(settings: Settings, listener: socket.socket, counts: Any, slot: int) -> None:
    _die_with_parent()
    stop = _child_stop_event()
    from pacsnode.core.logs import configure_logging

    configure_logging(settings.log_level, f"scp-{slot}", settings.log_format)
    run_worker(settings, listener, counts, slot, stop)


Service = Callable[[Settings, threading.Event], None]


def _service_main(name: str, target: Service, settings: Settings) -> None:
    _die_with_parent()
    stop = _child_stop_event()
    from pacsnode.core.logs import configure_logging

    configure_logging(settings.log_level, name, settings.log_format)
    target(settings, stop)


def _transport(settings: Settings) -> str:
    if settings.tls is None:
        return "plain TCP"
    if settings.tls.require_client_cert:
        return "TLS, client certificate required"
    return "TLS"


class SCPSupervisor:
    """Pre-forks the SCP workers and the node's other services (each
    ``(name, function(settings, stop_event))`` in its own process) and keeps
    them all running."""

    def __init__(self, settings: Settings, services: Sequence[tuple[str, Service]] = ()) -> None:
        self.settings = settings
        self.listener = bind_listener(settings)
        self._ctx = multiprocessing.get_context("fork")
        self._n = settings.effective_scp_processes
        self._counts = self._ctx.Array("i", self._n, lock=False)
        self._services = list(services)
        self._procs: list[multiprocessing.process.BaseProcess | None] = [None] * (
            self._n + len(self._services)
        )
        self._stop = threading.Event()

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def _spawn(self, slot: int) -> None:
        if slot < self._n:
            self._counts[slot] = 0
            target: Callable[..., None] = _worker_main
            args: tuple[Any, ...] = (self.settings, self.listener, self._counts, slot)
            name = f"pacsnode-scp-{slot}"
        else:
            service_name, service = self._services[slot - self._n]
            target, args = _service_main, (service_name, service, self.settings)
            name = f"pacsnode-{service_name}"
        proc = self._ctx.Process(target=target, args=args, name=name, daemon=False)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self._procs[slot] = proc

    def run(self) -> None:
        removed = Spool(self.settings.spool_dir, 0).clear_incoming()
        if removed:
            log.warning("removed %d unacknowledged partial data set(s) from a crash", removed)
        for slot in range(len(self._procs)):
            self._spawn(slot)
        log.info(
            "storage SCP %s listening on %s:%d (%s) with %d process(es)",
            self.settings.ae_title,
            self.settings.dicom_host,
            self.port,
            _transport(self.settings),
            self._n,
        )
        while not self._stop.wait(0.5):
            for slot, proc in enumerate(self._procs):
                if proc is not None and not proc.is_alive():
                    log.error("%s exited with %s; restarting", proc.name, proc.exitcode)
                    self._spawn(slot)
        for proc in self._procs:
            if proc is not None and proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.network_timeout_s + 5
        for proc in self._procs:
            if proc is not None:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    # Safe: what it acknowledged is on disk; a task it was
                    # running is redelivered (acks_late).
                    log.error("%s did not stop in time; killing it", proc.name)
                    proc.kill()
                    proc.join()
        self.listener.close()

    def stop(self) -> None:
        self._stop.set()
