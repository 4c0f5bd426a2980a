"""The embedded worker yields to the receiver: lower CPU priority, fewer
TensorFlow compute threads than cores."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

from pacsnode.serve import WORKER_NICE, yield_to_receiver


def _report(queue: multiprocessing.Queue) -> None:
    os.environ.pop("PACSNODE_TF_THREADS", None)
    before = os.nice(0)
    yield_to_receiver()
    queue.put((before, os.nice(0), os.environ["PACSNODE_TF_THREADS"]))


def test_worker_process_runs_niced_with_cores_minus_one_threads() -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_report, args=(queue,))
    proc.start()
    before, after, threads = queue.get(timeout=30)
    proc.join(timeout=30)
    assert after == min(19, before + WORKER_NICE)
    assert int(threads) == max(1, (os.cpu_count() or 1) - 1)


def test_tensorflow_takes_the_thread_count_from_the_environment() -> None:
    code = (
        "from pacsnode.models.tf_env import tf, TF_THREADS;"
        "print(TF_THREADS, tf.config.threading.get_intra_op_parallelism_threads(),"
        " tf.config.threading.get_inter_op_parallelism_threads())"
    )
    env = {**os.environ, "PACSNODE_TF_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["1", "1", "1"]
