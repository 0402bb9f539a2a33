"""The pool of idle in-memory DuckDB connections that ``Store.query`` borrows (see ``_Connections``)."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Callable

import duckdb


class _Connections:
    """A small pool of idle in-memory DuckDB connections with the union views, per store signature (file
    stamp, staged fragment lists). Opening a connection and creating its views costs ~25 ms, attaching
    the file ~1 ms; the file is never left attached. A query borrows a connection (one thread at a time
    uses it) and gives it back; at most ``max_idle`` stay open, and every idle one is closed before this
    process forks (a forked child that runs Python code before exec, as Ray's process launcher does,
    crashed while dozens of DuckDB instances were alive)."""

    def __init__(self, max_idle: int = 4):
        self.max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: list[tuple[Path, tuple, duckdb.DuckDBPyConnection]] = []

    @contextlib.contextmanager
    def borrow(self, path: Path, signature: tuple, build: Callable):
        """Yield (connection, True if ``build`` just made it and left the file attached)."""
        con = None
        with self._lock:
            for i, (p, sig, c) in enumerate(self._idle):
                if p == path and sig == signature:
                    con = c
                    del self._idle[i]
                    break
        fresh = con is None
        if fresh:
            con = duckdb.connect(":memory:")
            try:
                build(con)
            except BaseException:
                con.close()
                raise
        ok = False
        try:
            yield con, fresh
            ok = True
        finally:
            self._give_back(path, signature, con, ok)

    def _give_back(self, path: Path, signature: tuple, con, ok: bool) -> None:
        stale = [] if ok else [con]
        with self._lock:
            if ok:
                # entries of an older signature of this store are useless from now on
                stale += [c for p, sig, c in self._idle if p == path and sig != signature]
                self._idle = [e for e in self._idle if not (e[0] == path and e[1] != signature)]
                self._idle.append((path, signature, con))
                while len(self._idle) > self.max_idle:
                    stale.append(self._idle.pop(0)[2])
        for c in stale:
            with contextlib.suppress(duckdb.Error):
                c.close()

    def close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, _, c in idle:
            with contextlib.suppress(duckdb.Error):
                c.close()


_CONNECTIONS = _Connections()
os.register_at_fork(before=_CONNECTIONS.close_idle)
