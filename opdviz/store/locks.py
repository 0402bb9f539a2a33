"""The lock file a job holds while it computes a run: who computes it, and whether that process is alive."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from opdviz.store.schema import slug

if TYPE_CHECKING:
    from opdviz.store.core import Store


def lock_path(store: Store, run_id: str) -> Path:
    """The file a job holds locked (and names its pid and host in) while it computes ``run_id``."""
    return store.staging / "locks" / f"{slug(run_id)}.lock"


def computing(store: Store, run_id: str) -> bool | None:
    """Whether the process computing ``run_id`` is alive: True/False when its lock file names a process on
    this host, None when that cannot be told (no lock file, another host)."""
    try:
        text = lock_path(store, run_id).read_text()
    except OSError:
        return None
    m = re.fullmatch(r"pid (\d+)(?: on (.+))?", text.strip())
    if not m or (m.group(2) and m.group(2) != socket.gethostname()):
        return None
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
