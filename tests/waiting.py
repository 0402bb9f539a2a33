"""Deadline polling for tests that wait on another process (a worker, a server, a killed child)."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 180.0, what: str = "condition", every: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
