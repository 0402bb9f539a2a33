"""The precompute job: stream a base/post checkpoint pair, analyse every tensor, store the results.

Run it as ``opdviz compute BASE POST --name NAME --method LABEL --db PATH``. It is restartable: a
tensor whose results are in the store is never recomputed, so rerunning the same command after a
crash or ``kill -9`` finishes the run with results identical to an uninterrupted one. One tensor
pair is in memory at a time; a failure on one tensor is recorded (stage, error, message) and the
job goes on.

``run_jobs`` runs several runs as one job; where the tensors are computed is the executor's business
(``opdviz.engine.executors``: the local loop, or a Ray cluster with ``--executor ray``) — this process stays the
only writer of the store. Locally, runs that share a base are computed together: the loop iterates base
tensors and ``opdviz.engine.analyse.analyse_items`` analyses every post that has the tensor against one
shared base work.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from opdviz.engine.analyse import tensor_row
from opdviz.engine.local import LocalExecutor, Work
from opdviz.engine.progress import Progress, TotalBar, run_lock
from opdviz.engine.provenance import main_dtype, old_extra, package_versions, training_metadata
from opdviz.errors import DiskFullError, OptionsError, StoreError
from opdviz.io.adapters import open_post
from opdviz.io.naming import parse_name
from opdviz.io.reader import Checkpoint, plan_pairs
from opdviz.options import AnalysisOptions, check_label
from opdviz.store import dumps, now, RunWriter, slug, Store
from opdviz.store.progress import run_status_counts, run_stored

FOLD_EVERY_S = 60.0        # try to fold staged fragments into the .duckdb file this often
FOLD_WAIT_S = 30.0         # at the end, wait this long for a reader or another fold to let go of the file
# Fault injection for the crash tests (kill -9 at a chosen point): "after:N" kills the job with SIGKILL
# once N tensors are stored; "torn:N" kills it while writing the N-th tensor, after its metrics
# fragment and before its tensors marker; "enospc:N" makes writing the N-th tensor's metrics fragment fail
# with ENOSPC (a full disk, through the real error path); "worker-once:PATH" kills one Ray worker
# (opdviz.engine.executors). Unset in normal use.
FAULT_ENV = "OPDVIZ_FAULT"


@dataclass(frozen=True)
class JobSpec:
    """One analysis run: a base and a post-trained checkpoint, a name, a method label, options."""

    base: Path
    post: Path
    run_id: str
    method: str
    db: Path
    options: AnalysisOptions = AnalysisOptions()
    trajectory: str | None = None
    step: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_label(self.run_id, "run name")           # before any store or staging folder is touched
        check_label(self.method, "method label")
        if not isinstance(self.options, AnalysisOptions):
            raise OptionsError(f"options must be AnalysisOptions, got {type(self.options).__name__}")


def name_filter(opts: AnalysisOptions) -> Callable[[str], bool]:
    """Whether a tensor name is selected by ``--include`` / ``--exclude`` (the same rule for every analysis)."""
    inc = re.compile(opts.include) if opts.include else None
    exc = re.compile(opts.exclude) if opts.exclude else None
    return lambda name: (not inc or bool(inc.search(name))) and not (exc and exc.search(name))


def run_job(spec: JobSpec, *, progress: bool = True, overwrite: bool = False, log=print, executor=None) -> dict:
    """Compute (or resume) one run. Returns the final run row as a dict.

    ``executor`` (``opdviz.engine.executors``): where the tensors are computed; default ``LocalExecutor()``.
    """
    return run_jobs([spec], progress=progress, overwrite=overwrite, log=log, executor=executor)[0]


@dataclass
class _Run:
    """Driver-side state of one run of a job: its store, writer, run row and progress."""

    spec: JobSpec
    store: Store
    writer: RunWriter
    row: dict
    bar: "Progress"
    work: Work
    prior_wall: float
    status: str = "running"
    counts: dict = field(default_factory=dict)   # top-level tensors stored, by status (ok/skipped/failed)

    @property
    def n_stored(self) -> int:
        return sum(self.counts.values())

    def count(self, tensor_rows: list[dict]) -> None:
        """Count a tensor just written (its top-level row), so the end needs no query of the file."""
        for r in tensor_rows:
            if not r.get("parent"):
                self.counts[r["status"]] = self.counts.get(r["status"], 0) + 1


def run_jobs(specs: list[JobSpec], *, progress: bool = True, overwrite: bool = False, log=print,
             executor=None) -> list[dict]:
    """Compute (or resume) several runs as one job, their tensors in one pool of ``executor``.

    This process is the only writer: results come back from the executor and are written per tensor
    by each run's ``RunWriter``. Returns the final run rows, in the order of ``specs``.
    """
    if not specs:
        return []
    names = [s.run_id for s in specs]
    if len(set(names)) != len(names):
        raise OptionsError(f"run names must differ within one job: {sorted(n for n in set(names) if names.count(n) > 1)}")
    executor = executor or LocalExecutor()
    for db in dict.fromkeys(Path(s.db) for s in specs):
        Store(db).check()      # before any work: a foreign or broken --db is refused untouched
    t_start, status, error, full = time.time(), "running", None, False
    pending: list[StoreError] = []      # errors of the wrap-up, raised once it is complete
    with contextlib.ExitStack() as stack:
        runs: list[_Run] = []
        for n, spec in enumerate(specs):
            try:
                runs.append(_open_run(spec, n, stack, executor, overwrite, log, progress and len(specs) == 1))
            except BaseException as exc:      # runs opened so far must not stay "running"
                for run in runs:
                    _finish_run(run, "failed", f"job stopped before computing: {type(exc).__name__}: {exc}", 0.0)
                raise
        total = TotalBar(runs, progress and len(specs) > 1)
        stores = {str(r.store.db_path): r.store for r in runs}
        last_fold = time.time()
        stored_s = [0.0]

        def on_result(key: int, name: str, rows: tuple, nbytes: int) -> None:
            nonlocal last_fold
            run = runs[key]
            run.bar.start(name)
            _maybe_fault(run.writer, name, rows, run.bar.state["n_done"] + 1)
            t0 = time.perf_counter()
            run.writer.write_tensor(name, *rows)
            run.count(rows[0])
            stored_s[0] += time.perf_counter() - t0
            run.bar.advance(nbytes)
            total.advance(nbytes)
            if time.time() - last_fold > FOLD_EVERY_S:
                for store in stores.values():
                    try:
                        store.fold(wait=0)
                    except StoreError as exc:   # the fragments stay staged and readable; folded later
                        log(f"note: folding into {store.db_path} failed ({exc}); results stay in {store.staging}.")
                last_fold = time.time()

        def on_tasks(counts: dict) -> None:
            for run in runs:
                run.bar.tasks(counts)
            total.tasks(counts)

        try:
            executor.run([r.work for r in runs], on_result, on_tasks)
            status = "done"
        except KeyboardInterrupt:
            status, error = "interrupted", "stopped by a signal or the user"
            raise
        except DiskFullError as exc:
            status, error, full = "interrupted", f"the disk holding {runs[0].store.staging} is full", True
            kept = "; ".join(f"run {r.spec.run_id!r}: {r.n_stored} of {r.bar.state['n_total']} tensors stored"
                             for r in runs)
            raise DiskFullError(f"{exc} Kept: {kept}; other runs in the store are unchanged.") from None
        except Exception as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            total.close()
            stages = {**getattr(executor, "stages", {}), "store": stored_s[0], "wall": time.time() - t_start}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                stages["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            for run in runs:
                run.bar.state["job_stages_s"] = stages     # the job's profile (shared by its runs)
                # a run whose every tensor was written is done even when another run of the job failed
                finished = run.bar.state["n_done"] >= run.bar.state["n_total"]
                try:
                    _finish_run(run, "done" if finished else status, None if finished else error,
                                time.time() - t_start)
                except StoreError as exc:   # e.g. a full disk: the run's dead lock holder then reads interrupted
                    pending.append(exc)
            for store in stores.values():
                if full or pending or status == "interrupted":
                    break   # stop promptly; a full disk: folding needs space too. The fragments stay readable
                try:
                    ok = store.fold(wait=FOLD_WAIT_S)
                except DiskFullError as exc:
                    pending.append(exc)
                    continue
                except StoreError as exc:   # everything is computed and staged: never fail the job for this
                    log(f"note: folding into {store.db_path} failed ({exc}); results stay readable in "
                        f"{store.staging} and are folded by the next job or `opdviz fold`.")
                    continue
                if not ok:
                    log(f"note: {store.db_path} was busy; results stay readable in {store.staging} and are "
                        "folded into the database by the next job or `opdviz fold`.")
    if pending:
        raise pending[0]
    return [r.row for r in runs]


def _open_run(spec: JobSpec, key: int, stack: contextlib.ExitStack, executor, overwrite: bool, log,
              show: bool) -> _Run:
    """Plan one run, take its lock, write its run row and its skipped tensors; the todo goes to ``work``."""
    opts = spec.options
    store = Store(spec.db)
    base = stack.enter_context(Checkpoint.open(spec.base, allow_pickle=opts.allow_pickle))
    post = stack.enter_context(open_post(spec.post, base, allow_pickle=opts.allow_pickle))
    keep = name_filter(opts)
    items = [i for i in plan_pairs(base, post) if keep(i.name)]
    if not items:
        raise OptionsError(f"no tensor matches --include {opts.include!r} / --exclude {opts.exclude!r}")
    stack.enter_context(run_lock(store, spec.run_id))
    if overwrite:
        store.delete_run(spec.run_id)
    base_fp, post_fp = base.fingerprint(), post.fingerprint()
    old = store.run_row(spec.run_id)
    if old is not None:
        if (old.get("base_fingerprint"), old.get("post_fingerprint")) != (base_fp, post_fp) or \
                AnalysisOptions.from_json(old["options"]).result_key() != opts.result_key():
            raise OptionsError(
                f"a run named {spec.run_id!r} already exists in {spec.db} with other checkpoints or "
                "options; choose another --name, or pass --overwrite to replace it.")
    done, counts = run_stored(store, spec.run_id)
    todo = [i for i in items if i.name not in done]
    ok_items = [i for i in items if i.status == "ok"]
    bytes_total = sum(i.base.nbytes + i.post.nbytes for i in ok_items)
    bytes_done = sum(i.base.nbytes + i.post.nbytes for i in ok_items if i.name in done)
    created = old["created_at"] if old is not None else now()
    prior_wall = float(old["wall_s"] or 0) if old is not None else 0.0
    # the device that computed the results: a rerun with nothing left to do keeps the stored one
    device = old["device"] if old is not None and not todo and old.get("device") else executor.device_label(opts)
    writer = RunWriter(store, spec.run_id)
    row = {
        "method": spec.method, "kind": "trajectory" if spec.trajectory else "pair",
        "base_path": str(Path(base.path).resolve()), "post_path": str(Path(post.path).resolve()),
        "base_fingerprint": base_fp, "post_fingerprint": post_fp, "base_bytes": base.total_bytes,
        "post_bytes": post.total_bytes, "trajectory": spec.trajectory, "step": spec.step,
        "options": opts.to_json(), "versions": dumps(package_versions()), "device": device,
        "dtype": main_dtype(ok_items), "seed": opts.seed, "status": "running", "error": None,
        "created_at": created, "finished_at": None, "wall_s": prior_wall, "n_tensors": len(items),
        "n_done": len(items) - len(todo), "n_skipped": None, "n_failed": None,
        "bytes_total": bytes_total, "bytes_done": bytes_done,
        "extra": dumps({**old_extra(old), **training_metadata(post.path, log), **getattr(post, "run_extra", {}),
                        **spec.extra}),
    }
    writer.write_run(row)
    if todo and done:
        log(f"resuming {spec.run_id!r}: {len(items) - len(todo)} of {len(items)} tensors already stored")
    bar = Progress(store, spec.run_id, len(items), bytes_total, len(items) - len(todo), bytes_done, show)
    seq_of = {i.name: n for n, i in enumerate(items)}
    for item in (i for i in todo if i.status != "ok"):
        parsed = parse_name(item.name)
        info = item.base or item.post
        writer.write_tensor(item.name, [tensor_row(item.name, "", "", parsed, info.shape, info.dtype,
                                                    "skipped", item.reason, seq_of[item.name])], [], [], [])
        counts["skipped"] = counts.get("skipped", 0) + 1
        bar.advance(0)
    cache = None
    if opts.base_cache and getattr(executor, "name", "") == "local":
        from opdviz.engine.basecache import BaseCache, cache_root

        cache = BaseCache(cache_root(spec.db), base_fp, opts, executor.device_label(opts),
                          shapes=[i.shape for i in base.infos.values()], budget=base.total_bytes)
    work = Work(key=key, base=Path(spec.base), post=Path(spec.post), options=opts,
                items=[i for i in todo if i.status == "ok"], seq=seq_of, checkpoints=(base, post), cache=cache)
    return _Run(spec, store, writer, row, bar, work, prior_wall, counts=counts)


def _finish_run(run: _Run, status: str, error: str | None, wall: float) -> None:
    """Record the end of a run: its progress file and a last run row, with the counts of what is stored
    (the driver's own while a reader holds the file: that must not fail the end of a job)."""
    with contextlib.suppress(StoreError):   # the store's count; the driver's own while a reader holds the file
        run.counts = run_status_counts(run.store, run.spec.run_id, timeout=2.0)
    n = run.counts
    if status == "interrupted":
        error = (f"interrupted after {run.n_stored} of {run.bar.state['n_total']} tensors ({error}); rerun the same "
                 "command, or Resume, to continue from the stored tensors")
    run.row.update(status=status, error=error, wall_s=run.prior_wall + wall,
                   finished_at=now() if status == "done" else None,
                   n_done=run.n_stored, n_skipped=int(n.get("skipped", 0)),
                   n_failed=int(n.get("failed", 0)), bytes_done=run.bar.state["bytes_done"], updated_at=now())
    errors = []
    for step in (lambda: run.bar.finish(status, error or ""), lambda: run.writer.write_run(run.row)):
        try:
            step()
        except StoreError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def run_keyed(store: Store, job_id: str, table: str, units: list[tuple[str, int]], done: set[str],
              compute: Callable[[str], list[dict]], *, progress: bool, log, busy_note: str,
              resume_note: str = "") -> float:
    """Compute (or resume) a job whose results are rows of ``table`` keyed by a unit name (a tensor): the
    overlap of two runs, the metrics of a trajectory. The caller holds ``run_lock(store, job_id)``.

    ``units``: (name, bytes read to compute it) in compute order; ``done``: names already stored, skipped
    (``resume_note`` is logged when some are done and some are not); ``compute(name)``: the unit's rows,
    written as one keyed fragment (a rerun replaces them key by key). Progress goes to the job's
    progress file and bar; at the end the fragments are folded (``busy_note`` is logged when the file
    stayed busy: they stay readable). Returns the seconds spent from the first unit to the fold.
    """
    todo = [(name, nbytes) for name, nbytes in units if name not in done]
    total = sum(nbytes for _, nbytes in units)
    writer = RunWriter(store, job_id)
    bar = Progress(store, job_id, len(units), total, len(units) - len(todo),
                   total - sum(nbytes for _, nbytes in todo), progress)
    if done and todo and resume_note:
        log(resume_note)
    t0, status = time.time(), "failed"
    try:
        for name, nbytes in todo:
            bar.start(name)
            writer.write_keyed(table, name, compute(name))
            bar.advance(nbytes)
        status = "done"
    finally:
        bar.finish(status)
        if not store.fold(wait=FOLD_WAIT_S):
            log(busy_note)
    return time.time() - t0


def _maybe_fault(writer: RunWriter, key: str, rows, n: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    kind, _, at = spec.partition(":")
    if kind not in ("after", "torn", "enospc") or n != int(at or 0) + (kind == "after"):
        return
    if kind == "enospc":
        def full(table: str, tmp: Path) -> None:
            if table == "metrics":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        writer.inject = full
        return
    import signal

    if kind == "torn":
        tensors, metrics, arrays, failures = rows
        name = f"{writer.slug}__{slug(key)}.parquet"
        writer._write("metrics", [{**r, "run_id": writer.run_id} for r in metrics], name)
    os.kill(os.getpid(), signal.SIGKILL)


