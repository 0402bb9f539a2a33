"""The job queue: analyses submitted from the dashboard run one at a time in a detached worker.

A submission is a JSON file in ``<db>.staging/queue/`` (``opdviz.engine.jobfiles``). One worker process per
database (guarded by an flock on ``queue/worker.lock``) takes queued jobs oldest first and runs each in a
child process (``python -m opdviz.engine.queue run --db DB JOB_ID``, which calls
``opdviz.engine.runner.run_jobs`` for the post-trained checkpoints of the job; ``opdviz.engine.worker``), so
a crash or ``kill -9`` of one job never kills the worker and two jobs never fight over the database. The
worker is started with ``start_new_session=True``: it is not a child of the Streamlit session and survives
reloads, closed tabs and lost connections. It exits once the queue has been empty for ``IDLE_EXIT_S``
seconds; ``ensure_worker`` starts a new one when needed.

    job_id = submit(db, JobRequest(base="data/demo/base", posts=(("data/demo/opd", "opd", "OPD"),)))
    ensure_worker(db)
    for job in list_jobs(db):
        print(job.id, job.state, [(r.run_id, r.n_done, r.n_total) for r in job.runs])

Run a worker by hand with ``opdviz worker --db PATH`` (or ``python -m opdviz.engine.queue worker --db PATH``);
list and cancel with ``opdviz jobs --db PATH [--cancel ID]``.

This module is the queue's public face (submit, list, cancel, resume, start a worker) and the entry point
of its processes; it does not import torch, only the compute child does.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from opdviz.engine.jobfiles import (ACTIVE, INTERRUPTED_WORKER, JobRequest, JobStatus, RunProgress, ensure_queue,
                                    get_job, job_path, jobs_raw, list_jobs, queue_dir, queue_lock, read_json,
                                    result_path, worker_alive, write_json)
from opdviz.engine.worker import IDLE_EXIT_S, child_env, run_child, work
from opdviz.errors import OptionsError
from opdviz.options import AnalysisOptions, check_label
from opdviz.store import Store

__all__ = ["JobRequest", "JobStatus", "RunProgress", "cancel", "ensure_worker", "get_job", "list_jobs",
           "queue_dir", "resume", "submit", "work", "worker_alive"]


# ------------------------------------------------------------------------------------------ public

def submit(db: str | Path, request: JobRequest) -> str:
    """Queue ``request`` for the database ``db``; returns the job id. Does not start a worker
    (call ``ensure_worker``). Raises OptionsError for an inconsistent request (bad options, empty or
    repeated run names, a run name already queued) and StoreError when the queue cannot be written."""
    opts = AnalysisOptions.from_json(request.options)  # raises OptionsError with the reason
    if not request.posts:
        raise OptionsError("add at least one post-trained checkpoint")
    names = [name.strip() for _, name, _ in request.posts]
    if any(not n for n in names):
        raise OptionsError("every post-trained checkpoint needs a run name")
    if len(set(names)) != len(names):
        raise OptionsError(f"run names must differ within a job: {names}")
    posts = [[str(Path(p).expanduser().resolve()), name.strip(), (method or "post-trained").strip()]
             for p, name, method in request.posts]
    for _, name, method in posts:          # the browser's text: no control or invisible characters
        check_label(name, "run name")
        check_label(method, "method label")
    Store(db).check()      # a folder, an empty or a foreign file is refused before anything is written
    with queue_lock(db):
        busy = {r[1]: j["id"] for j in jobs_raw(db) if j["state"] in ACTIVE for r in j["posts"]}
        for n in names:
            if n in busy:
                raise OptionsError(f"a run named {n!r} is already queued or running (job {busy[n]}); "
                                   "wait for it, cancel it, or choose another run name")
        now = time.time()
        job_id = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + "-" + secrets.token_hex(3)
        job = {"id": job_id, "state": "queued", "base": str(Path(request.base).expanduser().resolve()),
               "posts": posts, "options": opts.to_json(), "db": str(Path(db).resolve()), "created": now,
               "queued_at": now, "started": None, "finished": None, "error": "", "attempts": 0,
               "attempt_started": None, "child_pid": None, "worker_pid": None, "cancel_requested": False,
               "returncode": None}
        write_json(job_path(db, job_id), job)
    return job_id


def cancel(db: str | Path, job_id: str) -> str:
    """Cancel a job: a queued one is dropped from the queue, a running one's compute process gets
    SIGTERM (it stops after the tensor in flight; the run stays resumable). Returns the new state."""
    path = job_path(db, job_id)
    with queue_lock(db):
        job = read_json(path)
        if job is None:
            raise OptionsError(f"no job {job_id!r} in {queue_dir(db)}")
        if job["state"] == "queued":
            job.update(state="cancelled", error="cancelled before it started", finished=time.time())
        elif job["state"] == "running":
            if not worker_alive(db):
                job.update(state="cancelled", error=INTERRUPTED_WORKER, finished=time.time())
            else:
                job["cancel_requested"] = True
                pid = job.get("child_pid")
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
        else:
            return job["state"]
        write_json(path, job)
        return job["state"]


def resume(db: str | Path, job_id: str) -> str:
    """Queue a failed or cancelled job again; the engine skips tensors already stored. Returns the id."""
    path = job_path(db, job_id)
    stale = not worker_alive(db)
    with queue_lock(db):
        job = read_json(path)
        if job is None:
            raise OptionsError(f"no job {job_id!r} in {queue_dir(db)}")
        state = "failed" if job["state"] == "running" and stale else job["state"]
        if state not in ("failed", "cancelled"):
            raise OptionsError(f"job {job_id} is {state}; only a failed or cancelled job can be resumed")
        job.update(state="queued", queued_at=time.time(), error="", cancel_requested=False, child_pid=None,
                   finished=None, returncode=None)
        result_path(db, job_id).unlink(missing_ok=True)
        write_json(path, job)
    return job_id


def ensure_worker(db: str | Path, *, idle_exit_s: float = IDLE_EXIT_S) -> bool:
    """Start a detached worker for ``db`` unless one runs; True when one was started.

    Checked under the queue lock, which an exiting worker also holds while it gives up its own lock,
    so a job submitted just as the worker leaves is never stranded."""
    Store(db).check()
    folder = ensure_queue(db)
    with queue_lock(db):
        if worker_alive(db) or _spawned_worker_starting(folder):
            return False
        cmd = [sys.executable, "-m", "opdviz.engine.queue", "worker", "--db", str(Path(db).resolve()),
               "--idle-exit", str(idle_exit_s)]
        with open(folder / "worker.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                    cwd=str(Path(__file__).resolve().parents[2]), env=child_env())
        (folder / "worker.spawned").write_text(str(proc.pid))
    # reap it when it exits, so a long-lived dashboard process collects no zombies
    threading.Thread(target=proc.wait, daemon=True).start()
    return True


def _spawned_worker_starting(folder: Path) -> bool:
    """True while the worker this host last spawned is alive but has not taken its lock yet."""
    try:
        pid = int((folder / "worker.spawned").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"opdviz.engine.queue" in cmdline and b"worker" in cmdline


# -------------------------------------------------------------------------------- process entry

def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m opdviz.engine.queue")
    sub = parser.add_subparsers(dest="action", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--db", required=True)
    w.add_argument("--idle-exit", type=float, default=IDLE_EXIT_S)
    r = sub.add_parser("run")
    r.add_argument("--db", required=True)
    r.add_argument("job_id")
    args = parser.parse_args(argv)
    if args.action == "worker":
        return 0 if work(args.db, idle_exit_s=args.idle_exit) else 1
    return run_child(args.db, args.job_id)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
