"""Import TensorFlow and Keras once, quietly, with the GPU set up for sharing.

Every TensorFlow module of pacsnode (:mod:`models.architectures`,
:mod:`models.runtime`, :mod:`models.training`, :mod:`models.evaluation`)
imports ``tf`` and ``keras`` from here, so the environment is prepared before
the first import. Importing TensorFlow costs about 2-3 s and 500 MB: only
workers import these modules, lazily, never the SCP, the database layer or the
CLI's fast paths. In a forking Celery worker the import belongs in the child
process (TensorFlow's thread pools do not survive ``fork``).
"""

from __future__ import annotations

import contextlib
import os

# Must be set before TensorFlow's C++ runtime starts: hides its start-up chatter.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

__all__ = ["gpus", "keras", "tf"]


def _enable_memory_growth() -> list[str]:
    """Let several worker processes share one GPU.

    Without memory growth the first process to touch the GPU reserves nearly
    all of its memory. The setting is only accepted before the GPU is
    initialised, which is why it runs at import time.
    """
    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        # RuntimeError: already initialised by the embedding process.
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
        names.append(str(gpu.name))
    return names


def threads_from_env(value: str | None) -> int:
    """``PACSNODE_TF_THREADS``: compute threads for TensorFlow's intra- and
    inter-op pools; 0 or unset: TensorFlow's default (one per core)."""
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0


def _limit_threads() -> int:
    """Leave a core to the receiver when workers share the host with the SCP
    (``pacsnode serve`` sets the variable; accepted before TF's first op only)."""
    n = threads_from_env(os.environ.get("PACSNODE_TF_THREADS"))
    if n:
        with contextlib.suppress(RuntimeError):
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
    return n


_GPUS = _enable_memory_growth()
TF_THREADS = _limit_threads()


def gpus() -> list[str]:
    """Names of the physical GPUs TensorFlow sees (empty on a CPU-only node)."""
    return list(_GPUS)
