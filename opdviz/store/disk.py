"""What can go wrong with the store's files: a full disk, another process's lock, a file that is not DuckDB."""

from __future__ import annotations

import errno
from pathlib import Path

from opdviz.errors import DiskFullError


def is_lock_error(exc: Exception) -> bool:
    text = str(exc)
    return "lock" in text.lower() or "Conflicting" in text or "being used" in text


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when a library (pyarrow, DuckDB) reports it only in its message."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


def disk_full(exc: BaseException, where: Path, doing: str) -> DiskFullError:
    """The one message for a full disk: what is full, what is kept, how to go on."""
    reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1]
    return DiskFullError(f"the disk holding {where} is full ({reason}) while {doing}. Everything stored before is "
                         "kept. Free space (or raise the quota), then rerun the same command: it resumes from the "
                         "stored results.")


def not_duckdb(path: Path) -> bool:
    """True when ``path`` exists but does not start with DuckDB's file header."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return len(head) >= 12 and head[8:12] != b"DUCK"
