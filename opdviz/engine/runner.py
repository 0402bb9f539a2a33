"""The precompute job: stream a base/post checkpoint pair, analyse every tensor, store the results.

Run it as ``opdviz compute BASE POST --name NAME --method LABEL --db PATH``. It is restartable: a
tensor whose results are in the store is never recomputed, so rerunning the same command after a
crash or ``kill -9`` finishes the run with results identical to an uninterrupted one. One tensor
pair is in memory at a time; a failure on one tensor is recorded (stage, error, message) and the
job goes on.

``run_jobs`` runs several runs as one job; where the tensors are computed is the executor's business
(``opdviz.engine.executors``: the local loop, or a Ray cluster with ``--executor ray``) — this process stays the
only writer of the store. Locally, runs that share a base are computed together: the loop iterates base
tensors and ``analyse_items`` analyses every post that has the tensor against one shared base work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import re
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from opdviz import __version__
from opdviz.io.adapters import open_post
from opdviz.errors import CheckpointError, DiskFullError, OpdvizError, OptionsError, StoreError
from opdviz.engine.executors import LocalExecutor, Work
from opdviz.metrics import add_coverage, analyse_pair, base_work, is_matrix_pair, timed
from opdviz.io.naming import fused_parts, matrix_view, parse_name, split_part
from opdviz.options import AnalysisOptions, check_label
from opdviz.io.reader import Checkpoint, PairItem, plan_pairs
from opdviz.io.safefiles import Limits, read_json
from opdviz.store import RunWriter, Store, disk_full, dumps, is_disk_full, lock_path, now, slug

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


def resolve_device(name: str) -> torch.device:
    """auto → cuda when available, else cpu; cuda without a GPU is an error that says what to do."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptionsError("--device cuda was asked for but torch sees no CUDA device "
                           f"(torch {torch.__version__}); use --device cpu or auto.")
    return torch.device(name)


def package_versions() -> dict:
    import duckdb
    import numpy
    import safetensors

    return {"opdviz": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "safetensors": safetensors.__version__, "duckdb": duckdb.__version__}


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


class Progress:
    """Progress on stderr (tqdm: tensors, bytes, ETA) and in ``<staging>/progress/<run>.json`` for the app."""

    def __init__(self, store: Store, run_id: str, n_total: int, bytes_total: int, n_done: int, bytes_done: int,
                 show: bool):
        self.path = store.staging / "progress" / f"{slug(run_id)}.json"
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


def _tensor_row(name: str, parent: str, part: str, parsed, shape, dtype: str, status: str, reason: str,
                seq: int, exact=None, seconds=None, expert=None, module=None) -> dict:
    rows = shape[0] if len(shape) >= 1 else None
    cols = int(torch.Size(shape[1:]).numel()) if len(shape) >= 2 else None
    numel = int(torch.Size(shape).numel())
    return {"tensor": name, "parent": parent, "part": part, "tower": parsed.tower, "layer": parsed.layer,
            "block": parsed.block, "module": module or parsed.module,
            "expert": parsed.expert if expert is None else expert, "param": parsed.param,
            "shape": list(shape), "rows": rows, "cols": cols, "numel": numel, "dtype": dtype, "status": status,
            "reason": reason, "spectrum_exact": exact, "seconds": seconds, "seq": seq}


def analyse_item(item: PairItem, wb: torch.Tensor, wp: torch.Tensor, opts: AnalysisOptions,
                 config: dict | None, seq: int) -> tuple[list, list, list, list]:
    """Rows (tensors, metrics, arrays, failures) for one stored tensor and its fused parts."""
    return analyse_items(wb, [(item, lambda: wp, seq)], opts, config)[0]


COVERAGE_BATCH_BYTES = 1 << 30    # packed masks (1 B/coordinate per post) held for a shared coverage pass


def analyse_items(wb: torch.Tensor, posts: list[tuple[PairItem, Callable[[], torch.Tensor], int]],
                  opts: AnalysisOptions, config: dict | None, stages: dict | None = None,
                  cache=None) -> list[tuple]:
    """Rows (tensors, metrics, arrays, failures) of one base tensor against each of several posts.

    ``posts``: (item, loader of the post tensor, seq) per post, all items naming the base tensor ``wb``.
    The base-only work (elementwise prepass, base factorization, principal-coverage reconstructions) is
    done once per unit (the tensor and its fused parts) and shared; each post tensor is loaded once,
    analysed, and dropped before the next. Results equal ``analyse_item`` of each pair alone.
    ``stages``: seconds by stage are added to it (read, elementwise, base_decomposition, ...).
    ``cache``: an ``opdviz.engine.basecache.BaseCache`` of this base: factors found there are used, costly
    ones computed here are kept there for later jobs.
    """
    item0 = posts[0][0]
    parsed = parse_name(item0.name)
    dtype = item0.base.dtype
    units: list[tuple[str, str, object]] = [("", "", None)]
    if opts.split_fused and wb.dim() >= 2:
        for part in fused_parts(item0.name, tuple(wb.shape), config):
            units.append((part.name(item0.name), part.suffix, part))

    def base_view(part):
        if part is None:
            # a 3-D stack of expert matrices is not one matrix: its parts get the spectra
            return matrix_view(item0.name, wb, config), tuple(wb.shape), wb.dim() == 2 or wb.dim() >= 4
        b = split_part(item0.name, wb, part, config)
        return b, tuple(b.shape), b.dim() == 2

    bases: dict[int, object] = {}                   # unit → BaseWork (None: base work failed)
    out: list[list] = [[None] * len(units) for _ in posts]   # [post][unit] → ("ok", res, s, shape) | failure
    pending: dict[int, list[int]] = {u: [] for u in range(len(units))}   # posts awaiting coverage

    def fail(pi: int, u: int, stage: str, exc: BaseException, seconds: float) -> None:
        name, suffix, part = units[u]
        message = str(exc) if isinstance(exc, OpdvizError) else traceback.format_exception(exc, limit=8)
        if isinstance(message, list):
            message = "".join(message)
        out[pi][u] = ("failed", {"tensor": name or item0.name, "stage": stage, "error": type(exc).__name__,
                                 "message": message},
                      f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", seconds)

    def flush(u: int) -> None:
        todo = pending[u]
        pending[u] = []
        if not todo:
            return
        t0 = time.perf_counter()
        try:
            b, _, _ = base_view(units[u][2])
            add_coverage(b, bases[u], [out[pi][u][1] for pi in todo], opts, stages)
        except Exception as exc:   # recorded for every post of the batch; the job goes on
            share = (time.perf_counter() - t0) / len(todo)
            for pi in todo:
                fail(pi, u, "metrics", exc, out[pi][u][2] + share)
            return
        share = (time.perf_counter() - t0) / len(todo)
        for pi in todo:
            kind, res, seconds, shape = out[pi][u]
            out[pi][u] = (kind, res, seconds + share, shape)

    for pi, (item, load, _) in enumerate(posts):
        t_read = time.perf_counter()
        wp = load()
        _add(stages, "read", time.perf_counter() - t_read)
        for u, (name, suffix, part) in enumerate(units):
            t0 = time.perf_counter()
            stage = "prepare"
            try:
                b, shape, is_matrix = base_view(part)
                p = matrix_view(item.name, wp, config) if part is None else split_part(item.name, wp, part, config)
                stage = "metrics"
                if u not in bases:
                    try:
                        bases[u] = _base_work(name or item0.name, b, opts, is_matrix, stages, cache)
                    except Exception:   # each post then computes alone and reports the error itself
                        bases[u] = None
                    # the base's time is shared by the posts of this job: charge it to the first
                if bases[u] is None:
                    res = analyse_pair(b, p, opts, matrix=is_matrix, stages=stages)
                else:
                    res = analyse_pair(b, p, opts, matrix=is_matrix, base=bases[u], coverage=False, stages=stages)
            except Exception as exc:  # recorded with stage and traceback; the job goes on
                fail(pi, u, stage, exc, time.perf_counter() - t0)
                continue
            out[pi][u] = ("ok", res, time.perf_counter() - t0, shape)
            if res.code is not None:
                pending[u].append(pi)
                if sum(out[i][u][1].code.numel() for i in pending[u]) >= COVERAGE_BATCH_BYTES:
                    flush(u)
        del wp
    for u in range(len(units)):
        flush(u)

    rows = []
    for pi, (item, _, seq) in enumerate(posts):
        tensors, metrics, arrays, failures = [], [], [], []
        for u, (name, suffix, part) in enumerate(units):
            key = name or item.name
            expert, module = (part.expert, part.module) if part else (None, None)
            entry = out[pi][u]
            if entry[0] == "failed":
                _, failure, reason, seconds = entry
                failures.append(failure)
                tensors.append(_tensor_row(key, item.name if part else "", suffix, parsed,
                                           tuple(wb.shape) if part is None else (), dtype, "failed", reason, seq,
                                           seconds=seconds, expert=expert, module=module))
                continue
            _, res, seconds, shape = entry
            tensors.append(_tensor_row(key, item.name if part else "", suffix, parsed, shape, dtype, "ok", "", seq,
                                       exact=res.exact, seconds=seconds, expert=expert, module=module))
            metrics.extend({"tensor": key, "metric": m, "value": float(v)} for m, v in res.scalars.items())
            for a, v in res.arrays.items():
                arrays.append({"tensor": key, "name": a, "shape": list(v.shape),
                               "values": v.astype("float64", copy=False).ravel().tolist()})
        rows.append((tensors, metrics, arrays, failures))
    return rows


def _base_work(name: str, b: torch.Tensor, opts: AnalysisOptions, is_matrix: bool, stages: dict | None, cache):
    """``base_work`` of one unit, through the base cache when there is one."""
    cached = None
    if cache is not None and is_matrix_pair(b, is_matrix):
        with timed(stages, "base_cache"):
            cached = cache.load(name, b)
    work = base_work(b, opts, matrix=is_matrix, stages=stages, factors=cached)
    if cache is not None and cached is None and work.factors is not None:
        with timed(stages, "base_cache"):
            cache.save(name, b, work.factors)
    return work


def _add(stages: dict | None, key: str, seconds: float) -> None:
    if stages is not None:
        stages[key] = stages.get(key, 0.0) + seconds


def training_metadata(post: Path, log=None) -> dict:
    """``metrics.json`` written by the trainer next to the post-trained weights (accuracy, loss, steps…),
    kept in ``runs.extra`` so the dashboard can show it beside the update metrics. Absent or invalid → {}.
    It is optional, so one that is refused (a symlink, over the size or depth caps of ``opdviz.io.safefiles``)
    is ignored with a warning to ``log`` instead of failing the run; none of its bytes are kept."""
    folder = Path(post) if Path(post).is_dir() else Path(post).parent
    try:
        data = read_json(folder, "metrics.json", Limits.from_env(), lenient=True)
    except CheckpointError as exc:
        if log:
            log(f"warning: ignoring the training metadata: {exc}")
        return {}
    except OSError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k != "history"}


def _filter(items: list[PairItem], opts: AnalysisOptions) -> list[PairItem]:
    inc = re.compile(opts.include) if opts.include else None
    exc = re.compile(opts.exclude) if opts.exclude else None
    return [i for i in items if (not inc or inc.search(i.name)) and not (exc and exc.search(i.name))]


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
        total = _TotalBar(runs, progress and len(specs) > 1)
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
    items = _filter(plan_pairs(base, post), opts)
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
    stored = store.query("SELECT tensor, parent, status FROM tensors WHERE run_id = ?", [spec.run_id])
    done = set(stored["tensor"])
    counts = stored[stored["parent"] == ""]["status"].value_counts().to_dict()
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
        "dtype": _main_dtype(ok_items), "seed": opts.seed, "status": "running", "error": None,
        "created_at": created, "finished_at": None, "wall_s": prior_wall, "n_tensors": len(items),
        "n_done": len(items) - len(todo), "n_skipped": None, "n_failed": None,
        "bytes_total": bytes_total, "bytes_done": bytes_done,
        "extra": dumps({**_old_extra(old), **training_metadata(post.path, log), **getattr(post, "run_extra", {}),
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
        writer.write_tensor(item.name, [_tensor_row(item.name, "", "", parsed, info.shape, info.dtype,
                                                    "skipped", item.reason, seq_of[item.name])], [], [], [])
        counts["skipped"] = counts.get("skipped", 0) + 1
        bar.advance(0)
    cache = None
    if opts.base_cache and getattr(executor, "name", "") == "local":
        from opdviz.engine.basecache import BaseCache, cache_root

        cache = BaseCache(cache_root(spec.db), base_fp, opts, executor.device_label(opts))
    work = Work(key=key, base=Path(spec.base), post=Path(spec.post), options=opts,
                items=[i for i in todo if i.status == "ok"], seq=seq_of, checkpoints=(base, post), cache=cache)
    return _Run(spec, store, writer, row, bar, work, prior_wall, counts={k: int(v) for k, v in counts.items()})


def _old_extra(old: dict | None) -> dict:
    """A resumed run keeps the details recorded when it started (e.g. a live trajectory's loss and step)."""
    try:
        extra = json.loads(old["extra"]) if old is not None and old.get("extra") else {}
    except (TypeError, ValueError):
        return {}
    return extra if isinstance(extra, dict) else {}


def _finish_run(run: _Run, status: str, error: str | None, wall: float) -> None:
    """Record the end of a run: its progress file and a last run row, with the counts of what is stored
    (the driver's own while a reader holds the file: that must not fail the end of a job)."""
    with contextlib.suppress(StoreError):   # the store's count; the driver's own while a reader holds the file
        df = run.store.query("SELECT status, count(*) AS n FROM tensors WHERE run_id = ? AND parent = '' "
                             "GROUP BY status", [run.spec.run_id], timeout=2.0)
        run.counts = {s: int(c) for s, c in zip(df["status"], df["n"])}
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


class _TotalBar:
    """One progress bar over all runs of a multi-run job (each run keeps its own progress file)."""

    def __init__(self, runs: list[_Run], show: bool):
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


def _main_dtype(items: list[PairItem]) -> str:
    by: dict[str, int] = {}
    for i in items:
        by[i.base.dtype] = by.get(i.base.dtype, 0) + i.base.nbytes
    return max(by, key=by.get) if by else ""
