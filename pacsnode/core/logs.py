"""Logging set-up shared by every pacsnode process.

Log lines carry UIDs, AE titles and hosts, never patient names or IDs: the
code that logs is written that way, and no handler here prints data sets.
``log_format: json`` writes one JSON object per line (for a log collector);
it holds the same message and nothing more, and no record attributes other
than the fixed fields below, so no data set can slip in through ``extra``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``,
    ``process`` (pacsnode's process name: ``main``, ``scp-0``, ``worker``…),
    ``pid``, ``logger``, ``message`` and, for errors, ``exception``."""

    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": self.process_name,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(
    level: str = "INFO", process_name: str = "main", log_format: str = "text"
) -> None:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process_name))
    else:
        fmt = f"%(asctime)s %(levelname)-7s [{process_name}] %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    quiet_libraries(level)


# Libraries whose INFO lines drown pacsnode's own (highdicom writes about ten
# "copy attributes of module ..." lines per output object; pynetdicom logs
# every PDU and DIMSE message, including summaries of data sets). They log at
# WARNING at every log level.
THIRD_PARTY = (
    "highdicom",
    "pynetdicom",
    "pydicom",
    "celery",
    "kombu",
    "amqp",
    "redis",
    "urllib3",
    "httpx",
    "httpcore",
    "tensorflow",
    "absl",
    "h5py",
    "matplotlib",
    "PIL",
    "alembic",
    "sqlalchemy",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "fastapi",
    "multipart",
    "asyncio",
)


def quiet_libraries(level: str) -> None:
    """Third-party loggers at WARNING, whatever ``level`` is.

    Their INFO and DEBUG lines can carry data sets (pynetdicom, pydicom and
    highdicom print PDUs and elements with patient names and IDs), and logs
    never carry patient data. ``level`` only lets TensorFlow's C++ start-up
    lines through at DEBUG (they hold no data sets).
    """
    debug = str(level).upper() == "DEBUG"
    # TensorFlow's C++ side logs to stderr on import, before any logger exists.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if debug else "2")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.WARNING)
