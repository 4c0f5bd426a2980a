"""Logging set-up shared by every pacsnode process.

Log lines carry UIDs, AE titles and hosts, never patient names or IDs: the
code that logs is written that way, and no handler here prints data sets.
"""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "INFO", process_name: str = "main") -> None:
    fmt = f"%(asctime)s %(levelname)-7s [{process_name}] %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    # pynetdicom logs every PDU and DIMSE message at INFO/DEBUG, including
    # summaries of data sets; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
