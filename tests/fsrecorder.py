"""A test helper: record the file system calls that name a path under a watched folder.

    rec = Recorder(monkeypatch, outside)
    ...                                   # code under test
    assert rec.calls == []                # nothing under ``outside`` was stat-ed, opened, listed or created
"""

from __future__ import annotations

import builtins
import io
import os
from pathlib import Path

import duckdb


class Recorder:
    """Records file system calls whose path lies under ``watched`` (monkeypatched os functions)."""

    NAMES = ("stat", "lstat", "open", "mkdir", "makedirs", "scandir", "listdir", "readlink", "access", "utime",
             "rename", "replace", "remove", "unlink", "rmdir")

    def __init__(self, monkeypatch, watched: Path):
        self.watched = os.path.normpath(str(watched))
        self.calls: list[tuple[str, str]] = []
        for name in self.NAMES:
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(name, real))
        monkeypatch.setattr(duckdb, "connect", self._wrap("duckdb.connect", duckdb.connect))
        monkeypatch.setattr(builtins, "open", self._wrap("open", builtins.open))
        monkeypatch.setattr(io, "open", self._wrap("io.open", io.open))

    def _watched(self, text: str) -> bool:
        p = os.path.normpath(os.path.join(os.getcwd(), text))
        return p == self.watched or p.startswith(self.watched.rstrip(os.sep) + os.sep)

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            first = args[0] if args else kwargs.get("path", kwargs.get("database"))
            if isinstance(first, (str, os.PathLike)):
                text = os.fspath(first)
                if isinstance(text, str) and self._watched(text):
                    self.calls.append((name, text))
            return real(*args, **kwargs)
        return call
