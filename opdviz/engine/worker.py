"""The queue's worker: the loop that runs queued jobs one at a time, and the compute child of each job.

``work`` (started detached by ``opdviz.engine.queue.ensure_worker``, or by hand with ``opdviz worker --db
PATH``) holds ``queue/worker.lock`` so one worker runs per database, claims queued jobs oldest first and runs
each in a child process (``python -m opdviz.engine.queue run --db DB JOB_ID``, whose body is ``run_child``:
``opdviz.engine.runner.run_jobs`` over the job's post-trained checkpoints), so a crash or ``kill -9`` of one
job never kills the worker. The child runs in its own process group, stopped as a whole on cancel or when
the worker leaves, and dies with the worker (``_die_with_parent``). Only the child imports torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from opdviz.engine.jobfiles import (INTERRUPTED_WORKER, ensure_queue, job_path, jobs_raw, list_jobs, log_path,
                                    queue_dir, queue_lock, read_json, result_path, write_json)
from opdviz.errors import OpdvizError
from opdviz.options import AnalysisOptions
from opdviz.store import Store

IDLE_EXIT_S = 30.0        # the worker exits after this long with nothing queued
POLL_S = 0.5              # how often an idle worker looks at the queue
STOP_GRACE_S = 10.0       # a compute process asked to stop (cancel, worker exit) is killed after this long
PARENT_ENV = "OPDVIZ_WORKER_PID"   # set for the compute child: the worker it must not outlive


def work(db: str | Path, *, idle_exit_s: float = IDLE_EXIT_S, poll_s: float = POLL_S,
         lock_wait_s: float = 2.0) -> bool:
    """The worker loop: run queued jobs one at a time until the queue stays empty for ``idle_exit_s``.
    Returns False at once if another worker holds ``db``'s worker lock.

    The compute processes run in their own process group, which is stopped when the worker leaves; a
    worker killed outright takes them along too (see ``_die_with_parent``)."""
    Store(db).check()
    folder = ensure_queue(db)
    fh = open(folder / "worker.lock", "a+")
    deadline = time.monotonic() + lock_wait_s
    while True:  # a moment's wait: list_jobs probes the lock briefly
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                fh.close()
                with queue_lock(db):
                    _forget_spawned(folder)
                return False
            time.sleep(0.05)
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}\n")
    fh.flush()
    _forget_spawned(folder)  # started: the lock now says it is alive
    child: list[subprocess.Popen] = []

    def on_term(signum, frame):  # stop the job in flight cleanly, then leave (the finally below waits)
        for p in child:
            _signal_group(p, signal.SIGTERM)
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        _recover_stale(db)
        _sweep_uploads(db)
        idle_since = time.monotonic()
        while True:
            with queue_lock(db):
                job = claim_next(db)
                if job is None and time.monotonic() - idle_since >= idle_exit_s:
                    fcntl.flock(fh, fcntl.LOCK_UN)  # released under the queue lock: see ensure_worker
                    return True
            if job is None:
                time.sleep(poll_s)
                continue
            _run(db, job, child)
            idle_since = time.monotonic()
    finally:
        signal.signal(signal.SIGTERM, old)
        for p in list(child):         # leaving with a job in flight (SIGTERM, Ctrl+C, a bug): stop it
            _stop(p)
        fh.close()


def _sweep_uploads(db) -> None:
    """Remove abandoned browser uploads (``OPDVIZ_UPLOAD_MAX_AGE_H``), keeping what this store's jobs read."""
    from opdviz.io.uploads import sweep_uploads

    keep = tuple(p for j in list_jobs(db) if j.active for p in (j.base, *(r.post for r in j.runs)))
    with contextlib.suppress(OpdvizError):   # a bad upload setting is the page's to report, not the worker's
        sweep_uploads(keep=keep)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the compute process and everything it started (its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM (the job records the interruption), then SIGKILL if it is still there after ``grace``."""
    if proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)


def _forget_spawned(folder: Path) -> None:
    """Drop ``worker.spawned`` (written by ``ensure_worker``) when it names this process."""
    marker = folder / "worker.spawned"
    with contextlib.suppress(OSError, ValueError):
        if int(marker.read_text()) == os.getpid():
            marker.unlink()


def _recover_stale(db) -> None:
    """Jobs left 'running' by a dead worker are marked failed (resumable)."""
    with queue_lock(db):
        for job in jobs_raw(db):
            if job["state"] == "running":
                job.update(state="failed", error=INTERRUPTED_WORKER, finished=time.time())
                write_json(job_path(db, job["id"]), job)


def claim_next(db) -> dict | None:
    """Mark the oldest queued job running for this worker and return it (None: nothing queued).
    Call under ``queue_lock``."""
    queued = [j for j in jobs_raw(db) if j["state"] == "queued"]
    if not queued:
        return None
    job = min(queued, key=lambda j: (j.get("queued_at", 0), j["id"]))
    now = time.time()
    job.update(state="running", started=job.get("started") or now, attempt_started=now,
               attempts=job.get("attempts", 0) + 1, worker_pid=os.getpid(), child_pid=None)
    write_json(job_path(db, job["id"]), job)
    return job


def _run(db, job: dict, child: list) -> None:
    job_id = job["id"]
    result = result_path(db, job_id)
    result.unlink(missing_ok=True)
    with open(log_path(db, job_id), "ab") as log:
        log.write(f"--- attempt {job['attempts']} at {time.ctime()}\n".encode())
        log.flush()
        # its own process group (stopped as a whole), and it must not outlive this worker
        proc = subprocess.Popen([sys.executable, "-m", "opdviz.engine.queue", "run", "--db", str(db), job_id],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                env={**child_env(), PARENT_ENV: str(os.getpid())})
        child.append(proc)
        with queue_lock(db):
            current = read_json(job_path(db, job_id)) or job
            current["child_pid"] = proc.pid
            write_json(job_path(db, job_id), current)
            if current.get("cancel_requested"):
                _signal_group(proc, signal.SIGTERM)
        rc = _wait(db, job_id, proc)
        child.remove(proc)
    reported = read_json(result) or {}
    with queue_lock(db):
        current = read_json(job_path(db, job_id)) or job
        if current.get("cancel_requested"):
            state, error = "cancelled", "cancelled; Resume continues from the tensors already stored"
        elif rc == 0:
            state, error = "done", ""
        elif reported.get("error"):
            state, error = "failed", reported["error"]
        elif rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
            state, error = "failed", (f"interrupted: the compute process was killed ({name}); Resume continues "
                                      "from the tensors already stored")
        else:
            state, error = "failed", f"the compute process exited with status {rc}; see {log_path(db, job_id)}"
        current.update(state=state, error=error, returncode=rc, child_pid=None, finished=time.time(),
                       results=reported.get("runs", []))
        write_json(job_path(db, job_id), current)


def _wait(db, job_id: str, proc: subprocess.Popen) -> int:
    """Wait for the compute process; once a cancel was asked for, kill it if it has not stopped within
    ``STOP_GRACE_S`` (a tensor in flight can take long; a killed job loses only that tensor)."""
    asked = None
    while True:
        try:
            return proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass
        if asked is None:
            if (read_json(job_path(db, job_id)) or {}).get("cancel_requested"):
                asked = time.monotonic()
                _signal_group(proc, signal.SIGTERM)
        elif time.monotonic() - asked > STOP_GRACE_S:
            _signal_group(proc, signal.SIGKILL)


def _die_with_parent(parent: int) -> None:
    """Make this compute process stop when the worker ``parent`` dies, ``kill -9`` included: the kernel sends
    SIGTERM on the parent's death (Linux PR_SET_PDEATHSIG), and a watchdog thread that sees the parent gone
    sends SIGTERM itself (other systems) and SIGKILL if the job has not stopped ``STOP_GRACE_S`` later."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="watch-worker", daemon=True).start()


def child_env() -> dict:
    """The environment of the worker and of its compute children: passive OpenMP waiting, and this
    repository first on ``PYTHONPATH`` so they import the same opdviz as the process that starts them."""
    from opdviz.engine.threads import child_env as passive_env

    env = passive_env()        # passive OpenMP waiting for the compute children (set before torch starts)
    root = str(Path(__file__).resolve().parents[2])           # the repository (this file is opdviz/engine/...)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_child(db: str | Path, job_id: str) -> int:
    """Body of the compute child: run every post-trained checkpoint of the job with ``run_job``,
    writing ``<id>.result.json`` (status, error, per-run counts). SIGTERM stops it cleanly."""
    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let run_job record the interruption undisturbed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    parent = os.environ.pop(PARENT_ENV, "")
    if parent.isdigit():
        _die_with_parent(int(parent))
    result = result_path(db, job_id)
    job = read_json(job_path(db, job_id))
    if job is None:
        print(f"no job {job_id} in {queue_dir(db)}", file=sys.stderr)
        return 2
    runs: list[dict] = []
    try:
        from opdviz.engine.runner import JobSpec, run_jobs
        from opdviz.engine.threads import apply_threads

        apply_threads()
        opts = AnalysisOptions.from_json(job["options"])
        # one job for every post: each base tensor is read and decomposed once for all of them
        specs = [JobSpec(base=Path(job["base"]), post=Path(post), run_id=name, method=method, db=Path(db),
                         options=opts) for post, name, method in job["posts"]]
        rows = run_jobs(specs, progress=False, log=lambda m: print(m, file=sys.stderr, flush=True))
        for spec, row in zip(specs, rows):
            name = spec.run_id
            runs.append({"run_id": name, **{k: row.get(k) for k in ("status", "n_done", "n_skipped", "n_failed",
                                                                     "wall_s")}})
            print(f"{name}: {row['status']} — {row['n_done']} tensors ({row['n_skipped']} skipped, "
                  f"{row['n_failed']} failed) in {row['wall_s']:.1f} s", file=sys.stderr, flush=True)
        write_json(result, {"status": "done", "error": "", "runs": runs})
        return 0
    except KeyboardInterrupt:
        write_json(result, {"status": "cancelled", "error": "cancelled", "runs": runs})
        return 130
    except OpdvizError as exc:
        print(f"error: {exc}", file=sys.stderr)
        write_json(result, {"status": "failed", "error": str(exc), "runs": runs})
        return 2
    except Exception as exc:  # a bug, not bad input: keep the traceback in the log, say where it is
        import traceback

        traceback.print_exc()
        write_json(result, {"status": "failed", "runs": runs,
                            "error": f"{type(exc).__name__}: {exc} (traceback in {log_path(db, job_id)})"})
        return 1
