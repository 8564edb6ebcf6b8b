"""Logging that tells the story of a build: one timed line per step, details at DEBUG."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger("uvmkit")

_depth = 0


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        if record.levelno <= logging.DEBUG:
            return f"  {message}"
        return message


def setup_logging(*, debug: bool = False) -> None:
    """Send uvmkit's log to stderr; DEBUG when asked for, INFO otherwise."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO)


def debug_enabled() -> bool:
    """True when the user asked for tracebacks and detail (`invoke --debug` or UVMKIT_DEBUG=1)."""
    if os.environ.get("UVMKIT_DEBUG", "") not in ("", "0"):
        return True
    # `invoke --debug` turns on DEBUG for the root logger.
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def human_size(size: float) -> str:
    """1536 -> '1.5 KB'; sizes in the log use powers of 1000, like `ls -h --si`."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """Log a step's start at DEBUG and its duration at INFO when it ends."""
    global _depth
    indent = "  " * _depth
    log.debug("%s‣ %s…", indent, title)
    start = time.monotonic()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    log.info("%s%s in %.1f s", indent, title, time.monotonic() - start)


def progress(*, total: int | None, desc: str, unit: str = "B") -> Any:
    """A tqdm bar on a terminal; on a pipe or in CI, a bar that prints nothing.

    Long steps also log plain lines at their end, so non-interactive output still
    says what happened.
    """
    interactive = sys.stderr.isatty() and log.isEnabledFor(logging.INFO)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        unit_divisor=1024 if unit == "B" else 1000,
        disable=not interactive,
        leave=False,
        file=sys.stderr,
    )
