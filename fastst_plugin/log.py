"""The ``fastst`` logger: one line per patched model, warnings for what stays stock."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("fastst")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[fastst] %(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False
logger.setLevel(os.environ.get("FASTST_LOG_LEVEL", "INFO").upper())

_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
