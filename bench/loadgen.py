"""Concurrent C-STORE senders and an RSS sampler, shared by ``bench/load``
and ``tests/test_load.py``: N associations in parallel, each sending its own
CT series, every C-STORE timed; the node's process tree sampled meanwhile."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from pacsnode.lab.phantom import SeriesSpec, ct_series_datasets
from pacsnode.scp import patches
from tests.support import child_pids


@dataclass
class LoadResult:
    acked: set[str] = field(default_factory=set)
    refused: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> status
    latencies_s: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    wall_s: float = 0.0
    study_uids: set[str] = field(default_factory=set)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

    def summary(self) -> str:
        n = len(self.latencies_s)
        return (
            f"{len(self.acked)} acknowledged, {len(self.refused)} refused, {n} C-STOREs in "
            f"{self.wall_s:.1f} s: {n / self.wall_s:.0f} instances/s, "
            f"{self.bytes_sent / self.wall_s / 1e6:.1f} MB/s; C-STORE latency "
            f"p50 {1000 * statistics.median(self.latencies_s):.1f} ms, "
            f"p95 {1000 * self.percentile(0.95):.1f} ms, "
            f"p99 {1000 * self.percentile(0.99):.1f} ms, "
            f"max {1000 * max(self.latencies_s):.1f} ms"
        )


def make_series(
    senders: int, per_sender: int, size: int, seed: int = 500
) -> list[list[pydicom.Dataset]]:
    """One CT series (its own study) per sender, in memory. The UIDs derive
    from the seed: different waves need different seeds."""
    return [
        ct_series_datasets(SeriesSpec(slices=per_sender, rows=size, columns=size, seed=seed + k))
        for k in range(senders)
    ]


def send_concurrently(
    port: int, series: list[list[pydicom.Dataset]], calling_ae: str = "STORESCU"
) -> LoadResult:
    # The senders are pynetdicom SCUs too: without the node's reactor
    # checkpoint, about one C-STORE in a few thousand loses its response to
    # the association's own reactor and waits for the DIMSE timeout.
    patches.install()
    result = LoadResult()
    lock = threading.Lock()
    errors: list[str] = []

    def sender(datasets: list[pydicom.Dataset]) -> None:
        ae = AE(ae_title=calling_ae)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
        if not assoc.is_established:
            errors.append("association not established")
            return
        try:
            for ds in datasets:
                if not assoc.is_established:  # aborted: the rest is not sent
                    break
                started = time.perf_counter()
                rsp = assoc.send_c_store(ds)
                took = time.perf_counter() - started
                status = int(rsp.Status) if "Status" in rsp else -1
                with lock:
                    result.latencies_s.append(took)
                    result.bytes_sent += len(ds.PixelData)
                    if status == 0x0000:
                        result.acked.add(str(ds.SOPInstanceUID))
                    else:
                        result.refused[str(ds.SOPInstanceUID)] = status
        finally:
            if assoc.is_established:
                assoc.release()

    threads = [threading.Thread(target=sender, args=(s,)) for s in series]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - started
    result.study_uids = {str(s[0].StudyInstanceUID) for s in series}
    if errors:
        raise RuntimeError(f"{len(errors)} sender(s) could not associate")
    return result


def _rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    line = next((x for x in status.splitlines() if x.startswith("VmRSS")), "VmRSS: 0 kB")
    return int(line.split()[1]) / 1024


class RssSampler:
    """Samples, every ``interval`` s, the RSS of the node's SCP-side
    processes (its children without children of their own: SCP processes,
    assembler, dispatcher) and of its whole tree (with the Celery worker)."""

    def __init__(self, supervisor_pid: int, interval: float = 0.2) -> None:
        self.pid = supervisor_pid
        self.interval = interval
        self.scp_peak_mb = 0.0
        self.tree_peak_mb = 0.0
        self.scp_start_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, float]:
        children = child_pids(self.pid)
        grandchildren = {c: child_pids(c) for c in children}
        scp = sum(_rss_mb(c) for c in children if not grandchildren[c])
        tree = _rss_mb(self.pid) + sum(
            _rss_mb(c) + sum(_rss_mb(g) for g in grandchildren[c]) for c in children
        )
        return scp, tree

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            scp, tree = self.sample()
            self.scp_peak_mb = max(self.scp_peak_mb, scp)
            self.tree_peak_mb = max(self.tree_peak_mb, tree)

    def __enter__(self) -> RssSampler:
        self.scp_start_mb = self.sample()[0]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
