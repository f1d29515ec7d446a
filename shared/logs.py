"""Logging setup and the one rule of what may be logged: records by hash, never personal data."""
from __future__ import annotations

import hashlib
import logging

from rich.logging import RichHandler


def configure_logging(level: str = "INFO") -> None:
    """Route the `megaportrait` logger through rich; idempotent."""
    logger = logging.getLogger("megaportrait")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(show_path=False, rich_tracebacks=False))
    logger.setLevel(level)


def short_hash(data: bytes | str, n: int = 12) -> str:
    """A short sha256 hex prefix to name a record in logs without revealing it."""
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()[:n]
