"""``RayExecutor`` (``opdviz compute … --executor ray``, needs ``pip install ".[ray]"``): the tensors of a job
spread over a Ray cluster.

The todo tensors of all runs are cut into tasks of about equal bytes (contiguous in stored order, so a task
opens each shard once); each task is a ``@ray.remote`` function that opens the checkpoints itself from paths
every node sees, computes its tensors with the same ``compute_items`` as a local run (on its own GPU when the
cluster has GPUs), and returns the result rows; the driver writes them as tasks finish (``ray.wait``). A
worker that dies has its task rerun by Ray (``max_retries``); since a task only reads and returns, a rerun
gives the same rows.

Fault injection for tests, read by the driver and passed to the tasks: ``OPDVIZ_FAULT=worker-once:PATH``
makes the first task that finds no file at PATH create it and kill its own worker (``os._exit(1)``).
"""

from __future__ import annotations

import os
import time

from opdviz.engine.analyse import resolve_device
from opdviz.engine.local import ResultSink, TaskSink, Work, compute_items, pair_bytes
from opdviz.engine.parallel import tensor_workers
from opdviz.engine.threads import child_env
from opdviz.errors import OpdvizError, OptionsError
from opdviz.io.adapters import open_post
from opdviz.io.reader import Checkpoint, PairItem, plan_pairs
from opdviz.options import AnalysisOptions


RAY_MAX_RETRIES = 3          # reruns of a task whose worker died (application errors are not retried)


TASKS_PER_WORKER = 4         # tasks per parallel slot: small enough tails, few enough checkpoint opens


RAY_INSTALL_HINT = 'pip install ".[ray]" (or pip install ray)'


# ---------------------------------------------------------------------------------------------- planning
def plan_tasks(works: list[Work], n_tasks: int) -> list[tuple[int, list[PairItem]]]:
    """Cut every run's items into groups of about ``total bytes / n_tasks``, largest group first.

    Groups are contiguous in stored order (a task then opens each shard once, and a tensor larger than
    the target is a group of its own), never mix runs (a task opens one checkpoint pair), and are
    returned in decreasing bytes so the big ones start first and the tail is short.
    """
    total = sum(pair_bytes(i) for w in works for i in w.items)
    target = max(1, total // max(1, n_tasks))
    groups: list[tuple[int, list[PairItem]]] = []
    for w in works:
        cur, size = [], 0
        for item in w.items:
            nb = pair_bytes(item)
            if cur and size + nb > target:
                groups.append((w.key, cur))
                cur, size = [], 0
            cur.append(item)
            size += nb
        if cur:
            groups.append((w.key, cur))
    return sorted(groups, key=lambda g: -sum(pair_bytes(i) for i in g[1]))


# ------------------------------------------------------------------------------------------------- ray
def import_ray():
    """``ray``, or an OptionsError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise OptionsError(f"--executor ray needs Ray, which is not installed here ({exc}); install it with "
                           f"{RAY_INSTALL_HINT}, or use --executor local.") from None
    return ray


def _maybe_kill_worker(fault: str) -> None:
    kind, _, marker = fault.partition(":")
    if kind != "worker-once" or not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"worker pid {os.getpid()} killed itself\n".encode())
    os.close(fd)
    os._exit(1)


def compute_group(base: str, post: str, options_json: str, names: list[str], seq: dict[str, int],
                  want_gpu: bool, threads: int, fault: str = "", ledger=None, task_id: int = -1) -> dict:
    """Body of one Ray task: open the pair, compute ``names`` (stored order), return their rows.

    ``threads``: torch CPU threads. Multithreaded float64 LAPACK/BLAS results depend on the thread count in
    the last bits, so the driver passes its own count and the results equal a local run's bit for bit.

    Returns {"device": str, "results": [(name, rows, bytes)], "seconds": float}. Pure: reads, never writes.
    """
    import torch

    if ledger is not None:
        ledger.started.remote(task_id)
    if fault:
        if ledger is not None:     # make sure the start is recorded before the worker dies
            import ray

            ray.get(ledger.ping.remote())
        _maybe_kill_worker(fault)
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    opts = AnalysisOptions.from_json(options_json)
    device = torch.device("cuda") if want_gpu else resolve_device(opts.device)
    with Checkpoint.open(base, allow_pickle=opts.allow_pickle) as b, \
            open_post(post, b, allow_pickle=opts.allow_pickle) as p:
        plan = {i.name: i for i in plan_pairs(b, p)}
        missing = [n for n in names if n not in plan or plan[n].status != "ok"]
        if missing:
            raise OpdvizError(f"task on {base} / {post}: tensors {missing[:3]} are not comparable on this node; "
                              "do all nodes see the same checkpoint files?")
        workers = tensor_workers(device, threads)      # as the local executor: the same results
        results = [(item.name, rows, pair_bytes(item))
                   for item, rows in compute_items(b, p, [plan[n] for n in names], opts, seq, device,
                                                   workers=workers)]
    return {"device": str(device.type), "results": results, "seconds": time.perf_counter() - t0}


class _Ledger:
    """A tiny actor the tasks report their starts to, so the driver can show running and retried tasks."""

    def __init__(self):
        self.starts: dict[int, int] = {}

    def started(self, task_id: int) -> None:
        self.starts[task_id] = self.starts.get(task_id, 0) + 1

    def ping(self) -> bool:
        return True

    def counts(self) -> dict[int, int]:
        return dict(self.starts)


class RayExecutor:
    """Spread the tensors over a Ray cluster; results come back to the driver, which writes them.

    Args:
        address: cluster address for ``ray.init`` (``auto``, ``ray://head:10001``, ``HOST:6379``); None
            starts a local Ray (or joins the one ``RAY_ADDRESS`` names). An already initialised Ray is used.
        gpus_per_task: GPUs each task asks for when the cluster has GPUs (fractions share a GPU).
        cpus_per_task: CPUs each task asks for and torch threads it uses (default: this process's torch
            thread count, which makes results identical to ``--executor local`` on the same hardware).
        tasks_per_worker: tasks per parallel slot (more → better balance, more checkpoint opens).
        fault: fault injection passed to the tasks (default: ``$OPDVIZ_FAULT`` when it is ``worker-once:…``).
    """

    name = "ray"

    def __init__(self, address: str | None = None, gpus_per_task: float = 1.0, cpus_per_task: int | None = None,
                 tasks_per_worker: int = TASKS_PER_WORKER, fault: str | None = None):
        import torch

        if gpus_per_task <= 0:
            raise OptionsError(f"--ray-gpus-per-task must be > 0, got {gpus_per_task}")
        if cpus_per_task is not None and cpus_per_task < 1:
            raise OptionsError(f"--ray-cpus-per-task must be ≥ 1, got {cpus_per_task}")
        self.cpus_per_task = cpus_per_task or torch.get_num_threads()
        self.ray = import_ray()
        self.address = address
        self.gpus_per_task = gpus_per_task
        self.tasks_per_worker = tasks_per_worker
        env = os.environ.get("OPDVIZ_FAULT", "")
        self.fault = fault if fault is not None else (env if env.startswith("worker-once:") else "")
        self._owns = False
        self.devices: set[str] = set()

    def _init(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            try:
                # a local Ray started for this job needs no dashboard; a cluster keeps its own settings
                extra = {} if self.address else {"include_dashboard": False, "configure_logging": False}
                # workers start torch themselves: give them passive OpenMP waiting (opdviz.engine.threads)
                env = {"OMP_WAIT_POLICY": child_env()["OMP_WAIT_POLICY"]}
                ray.init(address=self.address, log_to_driver=False, runtime_env={"env_vars": env}, **extra)
            except ConnectionError as exc:
                raise OptionsError(f"cannot reach the Ray cluster at {self.address!r}: {exc}. Start it with "
                                   "`ray start --head` (and `ray start --address HEAD:6379` on the other "
                                   "nodes), or drop --ray-address to start a local Ray.") from exc
            self._owns = True

    def _use_gpu(self, opts: AnalysisOptions) -> bool:
        gpus = self.ray.cluster_resources().get("GPU", 0)
        if opts.device == "cuda" and not gpus:
            raise OptionsError("--device cuda was asked for but the Ray cluster has no GPUs; "
                               "use --device auto or cpu.")
        return bool(gpus) and opts.device != "cpu"

    def device_label(self, opts: AnalysisOptions) -> str:
        self._init()
        return "ray:" + ("cuda" if self._use_gpu(opts) else "cpu")

    def slots(self, use_gpu: bool) -> int:
        res = self.ray.cluster_resources()
        if use_gpu:
            return max(1, int(res.get("GPU", 0) / self.gpus_per_task))
        return max(1, int(res.get("CPU", 1) / self.cpus_per_task))

    def run(self, works: list[Work], on_result: ResultSink, on_tasks: TaskSink | None = None) -> None:
        ray = self.ray
        self._init()
        works = [w for w in works if w.items]
        if not works:
            return
        use_gpu = {w.key: self._use_gpu(w.options) for w in works}
        if not all(use_gpu.values()):
            biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
            if self.cpus_per_task > biggest:
                raise OptionsError(f"each task asks for {self.cpus_per_task} CPUs but the largest Ray node has "
                                   f"{biggest:g}; pass --ray-cpus-per-task {max(1, int(biggest))} or less.")
        groups = plan_tasks(works, self.tasks_per_worker * self.slots(any(use_gpu.values())))
        by_key = {w.key: w for w in works}
        remote = ray.remote(max_retries=RAY_MAX_RETRIES, retry_exceptions=False)(compute_group)
        ledger = ray.remote(num_cpus=0)(_Ledger).remote()
        pending: dict = {}
        for tid, (key, items) in enumerate(groups):
            w = by_key[key]
            opt = {"num_cpus": 1 if use_gpu[key] else self.cpus_per_task}
            if use_gpu[key]:
                opt["num_gpus"] = self.gpus_per_task
            ref = remote.options(**opt, name=f"opdviz:{w.post.name}:{tid}").remote(
                str(w.base), str(w.post), w.options.to_json(), [i.name for i in items],
                {i.name: w.seq[i.name] for i in items}, use_gpu[key], self.cpus_per_task, self.fault, ledger, tid)
            pending[ref] = (key, tid)
        total, done = len(pending), 0

        def report():
            if on_tasks:
                starts = ray.get(ledger.counts.remote())
                retried = sum(max(0, n - 1) for n in starts.values())
                on_tasks({"total": total, "done": done, "running": max(0, len(starts) - done),
                          "retried": retried})

        report()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
                for ref in ready:
                    key, _ = pending.pop(ref)
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, OpdvizError):
                            raise cause from None
                        raise
                    except ray.exceptions.RayError as exc:
                        raise OpdvizError(f"a Ray task failed {RAY_MAX_RETRIES + 1} times ({type(exc).__name__}: "
                                          f"{str(exc).splitlines()[0] if str(exc) else ''}); stored tensors are "
                                          "kept: rerun the same command to resume.") from exc
                    self.devices.add(out["device"])
                    for name, rows, nbytes in out["results"]:
                        on_result(key, name, rows, nbytes)
                    done += 1
                report()
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            ray.kill(ledger)
            if self._owns:
                ray.shutdown()
                self._owns = False
