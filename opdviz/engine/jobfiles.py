"""The job queue on disk: job files, their lock, and the status of a job as the dashboard shows it.

Everything lives in ``<db>.staging/queue/``: ``<id>.job.json`` (the request and its state), ``<id>.result.json``
(what the compute child reports), ``<id>.log`` (its output), ``queue.lock`` and ``worker.lock``. Every change
of a job file happens under ``queue.lock`` (``queue_lock``, held for milliseconds) and is written to a temp
name then ``os.replace``d (``write_json``), so readers never see half a file and a cancel never races the
worker's claim. ``list_jobs`` joins a job file with the progress its compute child last wrote
(``opdviz.engine.progress``). The public face is ``opdviz.engine.queue``; the worker is ``opdviz.engine.worker``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from opdviz.engine.progress import read_progress
from opdviz.errors import OpdvizError, OptionsError, StoreError
from opdviz.options import AnalysisOptions
from opdviz.store import computing, Store

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
INTERRUPTED_WORKER = ("interrupted: the worker stopped while this job ran (killed or the machine restarted); "
                      "Resume continues from the tensors already stored")


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
    """The queue folder of the database ``db``: ``<db>.staging/queue``."""
    return Store(db).staging / "queue"


def job_path(db, job_id: str) -> Path:
    """``<id>.job.json``; an id that is not letters, digits and dashes is refused (it names a file)."""
    if not job_id or not all(c.isalnum() or c == "-" for c in job_id):
        raise OptionsError(f"{job_id!r} is not a job id (see `opdviz jobs --db {db}`)")
    return queue_dir(db) / f"{job_id}.job.json"


def result_path(db, job_id: str) -> Path:
    return queue_dir(db) / f"{job_id}.result.json"


def log_path(db, job_id: str) -> Path:
    return queue_dir(db) / f"{job_id}.log"


def ensure_queue(db) -> Path:
    """Create the queue folder if needed; a StoreError says so when the database location is not writable."""
    folder = queue_dir(db)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the job queue {folder}: {exc.strerror or exc}. The database location "
                         f"{db} must be writable; choose another one (OPDVIZ_DB / --db).") from exc
    return folder


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to a temp name, then ``os.replace`` it: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        hint = "the disk is full; free space" if exc.errno == errno.ENOSPC else "check the folder is writable"
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}; {hint}. Nothing stored was lost.") from exc


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def queue_lock(db):
    """Serialise changes to job files (submit, claim, finish, cancel, resume); held for milliseconds."""
    folder = ensure_queue(db)
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


def jobs_raw(db) -> list[dict]:
    """Every readable job file of ``db`` as stored, oldest first."""
    folder = queue_dir(db)
    if not folder.is_dir():
        return []
    jobs = [j for j in (read_json(p) for p in folder.glob("*.job.json")) if j and "id" in j]
    return sorted(jobs, key=lambda j: (j.get("created", 0), j["id"]))


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


# ---------------------------------------------------------------------------------------- status

def list_jobs(db: str | Path) -> list[JobStatus]:
    """Every job of ``db``, oldest first, with the progress its compute process last reported."""
    alive = worker_alive(db)
    out = []
    for job in jobs_raw(db):
        if job["state"] == "running" and not alive:
            # the worker died without recording the end (killed, machine restarted): show it as failed
            job = {**job, "state": "failed", "error": INTERRUPTED_WORKER}
        out.append(_status(db, job))
    return out


def get_job(db: str | Path, job_id: str) -> JobStatus:
    """The job ``job_id`` of ``db`` as ``list_jobs`` shows it; OptionsError when there is none."""
    for job in list_jobs(db):
        if job.id == job_id:
            return job
    raise OptionsError(f"no job {job_id!r} in {queue_dir(db)}")


def _status(db, job: dict) -> JobStatus:
    results = {r.get("run_id"): r for r in job.get("results") or []}
    runs = []
    for post, name, method in job["posts"]:
        runs.append(_run_progress(db, job, post, name, method, results.get(name)))
    return JobStatus(id=job["id"], state=job["state"], base=job["base"], runs=tuple(runs),
                     options=job.get("options", ""), created=job.get("created", 0.0), started=job.get("started"),
                     finished=job.get("finished"), error=job.get("error") or "", attempts=job.get("attempts", 0),
                     log=log_path(db, job["id"]))


def _run_progress(db, job: dict, post: str, name: str, method: str, result: dict | None) -> RunProgress:
    base = RunProgress(run_id=name, post=post, method=method)
    if job.get("attempt_started") is None:
        return base
    prog = read_progress(Store(db), name)
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
