"""What a running job shows and holds: its lock, its progress file and its progress bars.

``run_lock`` makes sure two processes never compute the same run (or overlap, or trajectory) at once;
``Progress`` keeps ``<staging>/progress/<run>.json`` up to date for the app (and a tqdm bar on stderr),
``read_progress`` reads it back (the job queue, the dashboard); ``TotalBar`` is the one bar over every run
of a multi-run job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from opdviz.errors import StoreError
from opdviz.store import disk_full, is_disk_full, lock_path, slug, Store


@contextlib.contextmanager
def run_lock(store: Store, run_id: str):
    """Exclusive lock on one run, so two jobs never compute the same run at once."""
    path = lock_path(store, run_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
    except OSError as exc:
        raise StoreError(f"cannot write next to {store.db_path} ({exc}); choose a writable --db location.") from exc
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise StoreError(f"run {run_id!r} is being computed right now by {holder}; wait for it to finish "
                         "or stop it before starting it again.") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
    except OSError as exc:
        fh.close()
        if is_disk_full(exc):
            raise disk_full(exc, path.parent, f"starting run {run_id!r}") from None
        raise StoreError(f"cannot write {path} ({exc}); choose a writable --db location.") from None
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def progress_path(store: Store, run_id: str) -> Path:
    """``<staging>/progress/<run>.json``: where the job computing ``run_id`` reports its progress."""
    return store.staging / "progress" / f"{slug(run_id)}.json"


def read_progress(store: Store, run_id: str) -> dict | None:
    """The progress the job computing ``run_id`` last wrote — run_id, pid, n_total, n_done, bytes_total,
    bytes_done, current (tensor), started (epoch s), status (running | done | failed | interrupted), eta_s,
    error, tasks — or None when there is none or it cannot be read."""
    try:
        data = json.loads(progress_path(store, run_id).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Progress:
    """Progress on stderr (tqdm: tensors, bytes, ETA) and in ``<staging>/progress/<run>.json`` for the app."""

    def __init__(self, store: Store, run_id: str, n_total: int, bytes_total: int, n_done: int, bytes_done: int,
                 show: bool):
        self.path = progress_path(store, run_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.state = {"run_id": run_id, "pid": os.getpid(), "n_total": n_total, "n_done": n_done,
                      "bytes_total": bytes_total, "bytes_done": bytes_done, "current": "",
                      "started": time.time(), "status": "running", "eta_s": None}
        self._bytes0 = bytes_done
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=bytes_total, initial=bytes_done, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=run_id[:24], dynamic_ncols=True, file=sys.stderr)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.state))
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full(exc, self.path.parent, f"writing the progress of run {self.state['run_id']!r}") from None
            raise StoreError(f"cannot write {self.path}: {exc}; check the folder is writable.") from None

    def start(self, name: str) -> None:
        self.state["current"] = name
        if self.bar:
            self.bar.set_postfix_str(f"{self.state['n_done']}/{self.state['n_total']} tensors · {name[-40:]}"
                                     + _tasks_text(self.state.get("tasks") or {}))
        self._write()

    def tasks(self, counts: dict) -> None:
        """Task counts of a distributed executor: {"total", "done", "running", "retried"}."""
        self.state["tasks"] = dict(counts)
        if self.bar:
            self.bar.set_postfix_str(f"{self.state['n_done']}/{self.state['n_total']} tensors"
                                     + _tasks_text(counts))
        self._write()

    def advance(self, nbytes: int) -> None:
        s = self.state
        s["n_done"] += 1
        s["bytes_done"] += nbytes
        elapsed = time.time() - s["started"]
        done_now = s["bytes_done"] - self._bytes0
        if done_now > 0:
            s["eta_s"] = elapsed * (s["bytes_total"] - s["bytes_done"]) / done_now
        if self.bar:
            self.bar.update(nbytes)
        self._write()

    def finish(self, status: str, error: str = "") -> None:
        self.state.update(status=status, current="", error=error, eta_s=0 if status == "done" else None)
        try:
            self._write()
        finally:
            if self.bar:
                self.bar.close()


class TotalBar:
    """One progress bar over all runs of a multi-run job (each run keeps its own progress file).

    ``runs``: the job's runs, each with its ``Progress`` as ``bar``."""

    def __init__(self, runs: list, show: bool):
        self.n_total = sum(r.bar.state["n_total"] for r in runs)
        self.n_done = sum(r.bar.state["n_done"] for r in runs)
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=sum(r.bar.state["bytes_total"] for r in runs),
                            initial=sum(r.bar.state["bytes_done"] for r in runs), unit="B", unit_scale=True,
                            unit_divisor=1024, desc=f"{len(runs)} runs", dynamic_ncols=True, file=sys.stderr)
        self.counts: dict = {}

    def _postfix(self) -> None:
        if self.bar:
            self.bar.set_postfix_str(f"{self.n_done}/{self.n_total} tensors" + _tasks_text(self.counts))

    def advance(self, nbytes: int) -> None:
        self.n_done += 1
        if self.bar:
            self.bar.update(nbytes)
        self._postfix()

    def tasks(self, counts: dict) -> None:
        self.counts = counts
        self._postfix()

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _tasks_text(counts: dict) -> str:
    if not counts:
        return ""
    return (f" · tasks {counts['done']}/{counts['total']} done, {counts['running']} running"
            + (f", {counts['retried']} retried" if counts.get("retried") else ""))
