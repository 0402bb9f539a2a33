"""The job queue: analyses submitted from the dashboard run one at a time in a detached worker.

A submission is a JSON file in ``<db>.staging/queue/``. One worker process per database (guarded by
an flock on ``queue/worker.lock``) takes queued jobs oldest first and runs each in a child process
(``python -m opdviz.engine.queue run --db DB JOB_ID``, which calls ``opdviz.engine.runner.run_job`` for every
post-trained checkpoint of the job), so a crash or ``kill -9`` of one job never kills the worker and
two jobs never fight over the database. The worker is started with ``start_new_session=True``: it
is not a child of the Streamlit session and survives reloads, closed tabs and lost connections. It
exits once the queue has been empty for ``IDLE_EXIT_S`` seconds; ``ensure_worker`` starts a new
one when needed.

    job_id = submit(db, JobRequest(base="data/demo/base", posts=(("data/demo/opd", "opd", "OPD"),)))
    ensure_worker(db)
    for job in list_jobs(db):
        print(job.id, job.state, [(r.run_id, r.n_done, r.n_total) for r in job.runs])

Run a worker by hand with ``opdviz worker --db PATH`` (or ``python -m opdviz.engine.queue worker --db PATH``);
list and cancel with ``opdviz jobs --db PATH [--cancel ID]``.

Every change of a job file happens under ``queue/queue.lock`` (held for milliseconds) and is written
to a temp name then ``os.replace``d, so readers never see half a file and a cancel never races the
worker's claim. This module does not import torch; only the child process does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from opdviz.errors import OpdvizError, OptionsError, StoreError
from opdviz.options import AnalysisOptions, check_label
from opdviz.store import Store, computing, slug

IDLE_EXIT_S = 30.0        # the worker exits after this long with nothing queued
POLL_S = 0.5              # how often an idle worker looks at the queue
STOP_GRACE_S = 10.0       # a compute process asked to stop (cancel, worker exit) is killed after this long
PARENT_ENV = "OPDVIZ_WORKER_PID"   # set for the compute child: the worker it must not outlive
STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class JobRequest:
    """What to analyse: one base, one or more (post path, run name, method label), options as JSON."""

    base: str
    posts: tuple[tuple[str, str, str], ...]
    options: str = field(default_factory=lambda: AnalysisOptions().to_json())


@dataclass(frozen=True)
class RunProgress:
    """One post-trained checkpoint of a job, with the progress its compute process last reported."""

    run_id: str
    post: str
    method: str
    status: str = "queued"     # queued | running | done | failed | interrupted
    n_done: int = 0            # tensors stored (including skipped ones)
    n_total: int | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    eta_s: float | None = None
    current: str = ""          # tensor being analysed now
    n_failed: int | None = None  # tensors recorded as failures (NaN/Inf, …); known once the run ends
    n_skipped: int | None = None
    error: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, self.n_done / self.n_total) if self.n_total else 0.0


@dataclass(frozen=True)
class JobStatus:
    """A job as the dashboard shows it."""

    id: str
    state: str                 # one of STATES
    base: str
    runs: tuple[RunProgress, ...]
    options: str
    created: float
    started: float | None
    finished: float | None
    error: str                 # why it failed or was cancelled ("" otherwise)
    attempts: int
    log: Path

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def n_done(self) -> int:
        return sum(r.n_done for r in self.runs)

    @property
    def n_total(self) -> int | None:
        totals = [r.n_total for r in self.runs]
        return None if any(t is None for t in totals) else sum(totals)


# ------------------------------------------------------------------------------------------- files

def queue_dir(db: str | Path) -> Path:
    return Store(db).staging / "queue"


def _job_path(db, job_id: str) -> Path:
    if not job_id or not all(c.isalnum() or c == "-" for c in job_id):
        raise OptionsError(f"{job_id!r} is not a job id (see `opdviz jobs --db {db}`)")
    return queue_dir(db) / f"{job_id}.job.json"


def _result_path(db, job_id: str) -> Path:
    return queue_dir(db) / f"{job_id}.result.json"


def _log_path(db, job_id: str) -> Path:
    return queue_dir(db) / f"{job_id}.log"


def _ensure_queue(db) -> Path:
    folder = queue_dir(db)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the job queue {folder}: {exc.strerror or exc}. The database location "
                         f"{db} must be writable; choose another one (OPDVIZ_DB / --db).") from exc
    return folder


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        hint = "the disk is full; free space" if exc.errno == errno.ENOSPC else "check the folder is writable"
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}; {hint}. Nothing stored was lost.") from exc


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _queue_lock(db):
    """Serialise changes to job files (submit, claim, finish, cancel, resume); held for milliseconds."""
    folder = _ensure_queue(db)
    try:
        fh = open(folder / "queue.lock", "a+")
    except OSError as exc:
        raise StoreError(f"cannot write in {folder}: {exc.strerror or exc}; choose a writable database "
                         "location.") from exc
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _jobs_raw(db) -> list[dict]:
    folder = queue_dir(db)
    if not folder.is_dir():
        return []
    jobs = [j for j in (_read_json(p) for p in folder.glob("*.job.json")) if j and "id" in j]
    return sorted(jobs, key=lambda j: (j.get("created", 0), j["id"]))


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
    with _queue_lock(db):
        busy = {r[1]: j["id"] for j in _jobs_raw(db) if j["state"] in ACTIVE for r in j["posts"]}
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
        _write_json(_job_path(db, job_id), job)
    return job_id


def list_jobs(db: str | Path) -> list[JobStatus]:
    """Every job of ``db``, oldest first, with the progress its compute process last reported."""
    alive = worker_alive(db)
    out = []
    for job in _jobs_raw(db):
        if job["state"] == "running" and not alive:
            # the worker died without recording the end (killed, machine restarted): show it as failed
            job = {**job, "state": "failed", "error": _INTERRUPTED_WORKER}
        out.append(_status(db, job))
    return out


def get_job(db: str | Path, job_id: str) -> JobStatus:
    for job in list_jobs(db):
        if job.id == job_id:
            return job
    raise OptionsError(f"no job {job_id!r} in {queue_dir(db)}")


def cancel(db: str | Path, job_id: str) -> str:
    """Cancel a job: a queued one is dropped from the queue, a running one's compute process gets
    SIGTERM (it stops after the tensor in flight; the run stays resumable). Returns the new state."""
    path = _job_path(db, job_id)
    with _queue_lock(db):
        job = _read_json(path)
        if job is None:
            raise OptionsError(f"no job {job_id!r} in {queue_dir(db)}")
        if job["state"] == "queued":
            job.update(state="cancelled", error="cancelled before it started", finished=time.time())
        elif job["state"] == "running":
            if not worker_alive(db):
                job.update(state="cancelled", error=_INTERRUPTED_WORKER, finished=time.time())
            else:
                job["cancel_requested"] = True
                pid = job.get("child_pid")
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
        else:
            return job["state"]
        _write_json(path, job)
        return job["state"]


def resume(db: str | Path, job_id: str) -> str:
    """Queue a failed or cancelled job again; the engine skips tensors already stored. Returns the id."""
    path = _job_path(db, job_id)
    stale = not worker_alive(db)
    with _queue_lock(db):
        job = _read_json(path)
        if job is None:
            raise OptionsError(f"no job {job_id!r} in {queue_dir(db)}")
        state = "failed" if job["state"] == "running" and stale else job["state"]
        if state not in ("failed", "cancelled"):
            raise OptionsError(f"job {job_id} is {state}; only a failed or cancelled job can be resumed")
        job.update(state="queued", queued_at=time.time(), error="", cancel_requested=False, child_pid=None,
                   finished=None, returncode=None)
        _result_path(db, job_id).unlink(missing_ok=True)
        _write_json(path, job)
    return job_id


def worker_alive(db: str | Path) -> bool:
    """True while a worker holds the worker lock of ``db``."""
    lock = queue_dir(db) / "worker.lock"
    try:
        fh = open(lock, "r")
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def ensure_worker(db: str | Path, *, idle_exit_s: float = IDLE_EXIT_S) -> bool:
    """Start a detached worker for ``db`` unless one runs; True when one was started.

    Checked under the queue lock, which an exiting worker also holds while it gives up its own lock,
    so a job submitted just as the worker leaves is never stranded."""
    Store(db).check()
    folder = _ensure_queue(db)
    with _queue_lock(db):
        if worker_alive(db) or _spawned_worker_starting(folder):
            return False
        cmd = [sys.executable, "-m", "opdviz.engine.queue", "worker", "--db", str(Path(db).resolve()),
               "--idle-exit", str(idle_exit_s)]
        with open(folder / "worker.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                    cwd=str(Path(__file__).resolve().parents[2]), env=_child_env())
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


# ------------------------------------------------------------------------------------------ worker

_INTERRUPTED_WORKER = ("interrupted: the worker stopped while this job ran (killed or the machine restarted); "
                       "Resume continues from the tensors already stored")


def work(db: str | Path, *, idle_exit_s: float = IDLE_EXIT_S, poll_s: float = POLL_S,
         lock_wait_s: float = 2.0) -> bool:
    """The worker loop: run queued jobs one at a time until the queue stays empty for ``idle_exit_s``.
    Returns False at once if another worker holds ``db``'s worker lock.

    The compute processes run in their own process group, which is stopped when the worker leaves; a
    worker killed outright takes them along too (see ``_die_with_parent``)."""
    Store(db).check()
    folder = _ensure_queue(db)
    fh = open(folder / "worker.lock", "a+")
    deadline = time.monotonic() + lock_wait_s
    while True:  # a moment's wait: list_jobs probes the lock briefly
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                fh.close()
                with _queue_lock(db):
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
            with _queue_lock(db):
                job = _claim_next(db)
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
    marker = folder / "worker.spawned"
    with contextlib.suppress(OSError, ValueError):
        if int(marker.read_text()) == os.getpid():
            marker.unlink()


def _recover_stale(db) -> None:
    """Jobs left 'running' by a dead worker are marked failed (resumable)."""
    with _queue_lock(db):
        for job in _jobs_raw(db):
            if job["state"] == "running":
                job.update(state="failed", error=_INTERRUPTED_WORKER, finished=time.time())
                _write_json(_job_path(db, job["id"]), job)


def _claim_next(db) -> dict | None:
    queued = [j for j in _jobs_raw(db) if j["state"] == "queued"]
    if not queued:
        return None
    job = min(queued, key=lambda j: (j.get("queued_at", 0), j["id"]))
    now = time.time()
    job.update(state="running", started=job.get("started") or now, attempt_started=now,
               attempts=job.get("attempts", 0) + 1, worker_pid=os.getpid(), child_pid=None)
    _write_json(_job_path(db, job["id"]), job)
    return job


def _run(db, job: dict, child: list) -> None:
    job_id = job["id"]
    result_path = _result_path(db, job_id)
    result_path.unlink(missing_ok=True)
    with open(_log_path(db, job_id), "ab") as log:
        log.write(f"--- attempt {job['attempts']} at {time.ctime()}\n".encode())
        log.flush()
        # its own process group (stopped as a whole), and it must not outlive this worker
        proc = subprocess.Popen([sys.executable, "-m", "opdviz.engine.queue", "run", "--db", str(db), job_id],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                env={**_child_env(), PARENT_ENV: str(os.getpid())})
        child.append(proc)
        with _queue_lock(db):
            current = _read_json(_job_path(db, job_id)) or job
            current["child_pid"] = proc.pid
            _write_json(_job_path(db, job_id), current)
            if current.get("cancel_requested"):
                _signal_group(proc, signal.SIGTERM)
        rc = _wait(db, job_id, proc)
        child.remove(proc)
    result = _read_json(result_path) or {}
    with _queue_lock(db):
        current = _read_json(_job_path(db, job_id)) or job
        if current.get("cancel_requested"):
            state, error = "cancelled", "cancelled; Resume continues from the tensors already stored"
        elif rc == 0:
            state, error = "done", ""
        elif result.get("error"):
            state, error = "failed", result["error"]
        elif rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
            state, error = "failed", (f"interrupted: the compute process was killed ({name}); Resume continues "
                                      "from the tensors already stored")
        else:
            state, error = "failed", f"the compute process exited with status {rc}; see {_log_path(db, job_id)}"
        current.update(state=state, error=error, returncode=rc, child_pid=None, finished=time.time(),
                       results=result.get("runs", []))
        _write_json(_job_path(db, job_id), current)


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
            if (_read_json(_job_path(db, job_id)) or {}).get("cancel_requested"):
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


def _child_env() -> dict:
    from opdviz.engine.threads import child_env

    env = child_env()          # passive OpenMP waiting for the compute children (set before torch starts)
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
    result_path = _result_path(db, job_id)
    job = _read_json(_job_path(db, job_id))
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
        _write_json(result_path, {"status": "done", "error": "", "runs": runs})
        return 0
    except KeyboardInterrupt:
        _write_json(result_path, {"status": "cancelled", "error": "cancelled", "runs": runs})
        return 130
    except OpdvizError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _write_json(result_path, {"status": "failed", "error": str(exc), "runs": runs})
        return 2
    except Exception as exc:  # a bug, not bad input: keep the traceback in the log, say where it is
        import traceback

        traceback.print_exc()
        _write_json(result_path, {"status": "failed", "runs": runs,
                                  "error": f"{type(exc).__name__}: {exc} (traceback in {_log_path(db, job_id)})"})
        return 1


# ---------------------------------------------------------------------------------------- progress

def _status(db, job: dict) -> JobStatus:
    results = {r.get("run_id"): r for r in job.get("results") or []}
    runs = []
    for post, name, method in job["posts"]:
        runs.append(_run_progress(db, job, post, name, method, results.get(name)))
    return JobStatus(id=job["id"], state=job["state"], base=job["base"], runs=tuple(runs),
                     options=job.get("options", ""), created=job.get("created", 0.0), started=job.get("started"),
                     finished=job.get("finished"), error=job.get("error") or "", attempts=job.get("attempts", 0),
                     log=_log_path(db, job["id"]))


def _run_progress(db, job: dict, post: str, name: str, method: str, result: dict | None) -> RunProgress:
    base = RunProgress(run_id=name, post=post, method=method)
    if job.get("attempt_started") is None:
        return base
    prog = _read_json(Store(db).staging / "progress" / f"{slug(name)}.json")
    # a progress file older than this attempt belongs to an earlier job of the same run name
    if not prog or prog.get("started", 0) < job["attempt_started"] - 1.0:
        if job["state"] in ("done", "failed", "cancelled") and result:
            return RunProgress(name, post, method, status=result.get("status") or "done",
                               n_failed=result.get("n_failed"), n_skipped=result.get("n_skipped"),
                               n_done=result.get("n_done") or 0, n_total=result.get("n_done"))
        return base
    status = prog.get("status", "running")
    if status == "running" and (job["state"] != "running" or computing(Store(db), name) is False):
        status = "interrupted"  # the process died without writing its end
    n_done = int(prog.get("n_done", 0))
    if status == "interrupted":
        # what a resume will not recompute: the store's count (the progress file may lag a killed job)
        with contextlib.suppress(OpdvizError):
            n_done = Store(db).stored_counts().get(name, n_done)
    return RunProgress(run_id=name, post=post, method=method, status=status, n_done=n_done,
                       n_total=prog.get("n_total"), bytes_done=int(prog.get("bytes_done", 0)),
                       bytes_total=prog.get("bytes_total"), eta_s=prog.get("eta_s"),
                       current=prog.get("current", "") if status == "running" else "",
                       n_failed=(result or {}).get("n_failed"), n_skipped=(result or {}).get("n_skipped"),
                       error=prog.get("error", "") or "")


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
