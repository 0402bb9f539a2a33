"""The computing loop every executor runs, and the local executor that runs it in this process.

A ``Work`` is the todo tensors of one run. ``compute_shared`` iterates the base tensors, each read once,
and analyses every post that has it (``opdviz.engine.analyse.analyse_items``: base work shared);
``LocalExecutor`` runs it over the works of a job, grouped by base, and hands each result to the driver
(``opdviz.engine.runner``), which stays the only writer of the store.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from opdviz.engine.analyse import analyse_items, resolve_device
from opdviz.engine.parallel import run_ordered, tensor_workers, working_bytes
from opdviz.io.adapters import open_post
from opdviz.io.reader import Checkpoint, PairItem
from opdviz.options import AnalysisOptions


@dataclass
class Work:
    """The todo tensors of one run: everything a worker needs to compute them anywhere."""

    key: int                              # index of the run in the job
    base: Path
    post: Path
    options: AnalysisOptions
    items: list[PairItem]                 # "ok" items still to compute, in stored order
    seq: dict[str, int]                   # tensor name → position in the run's plan (stored as tensors.seq)
    checkpoints: tuple | None = field(default=None, repr=False)   # already open (base, post): local reuse
    cache: object | None = field(default=None, repr=False)        # opdviz.engine.basecache.BaseCache of the base


# on_result(work key, tensor name, (tensors, metrics, arrays, failures) rows, bytes of the pair)
ResultSink = Callable[[int, str, tuple, int], None]


# on_tasks({"total", "done", "running", "retried"}) whenever the task counts change
TaskSink = Callable[[dict], None]


def pair_bytes(item: PairItem) -> int:
    return item.base.nbytes + item.post.nbytes


def compute_items(base: Checkpoint, post: Checkpoint, items: list[PairItem], opts: AnalysisOptions,
                  seq: dict[str, int], device, stages: dict | None = None, workers: int = 1
                  ) -> Iterator[tuple[PairItem, tuple]]:
    """Yield (item, rows) for each item of one pair (``compute_shared`` with one post)."""
    for _, item, rows in compute_shared(base, [(0, post, items, seq)], opts, device, stages, workers=workers):
        yield item, rows


def compute_shared(base: Checkpoint, posts: list[tuple[int, Checkpoint, list[PairItem], dict[str, int]]],
                   opts: AnalysisOptions, device, stages: dict | None = None, cache=None, workers: int = 1
                   ) -> Iterator[tuple[int, PairItem, tuple]]:
    """The one computing loop every executor runs: iterate the base tensors, each read once, and for
    each analyse every post that has it (``opdviz.engine.analyse.analyse_items``: base work shared).

    ``posts``: (key, post checkpoint, its todo items, its seq map) per post-trained checkpoint of this
    base. Yields (key, item, rows) per post and tensor. Base tensors are visited in the first post's
    plan order (base shard, post shard, offset); each post tensor is read once. ``cache``: the base's
    ``opdviz.engine.basecache.BaseCache`` (factors reused from and kept for other jobs), or None.
    ``workers``: base tensors analysed at once, each in its own thread (``opdviz.engine.parallel``); the
    results are yielded in the same order.
    """
    by_name: dict[str, list[tuple[int, Checkpoint, PairItem, int]]] = {}
    order: dict[str, tuple] = {}
    for key, ck, items, seq in posts:
        for item in items:
            if item.status != "ok":
                continue
            by_name.setdefault(item.name, []).append((key, ck, item, seq[item.name]))
            order.setdefault(item.name, (str(item.base.file), str(item.post.file), item.base.offset))
    names = sorted(by_name, key=order.__getitem__)
    reading = threading.Lock()          # a checkpoint may keep one open file handle: one reader at a time

    def locked(load, *args):
        with reading:
            return load(*args)

    def analyse(name: str, local: dict) -> list:
        """The rows of base tensor ``name`` against its posts; its stage times into ``local``."""
        group = by_name[name]
        t0 = time.perf_counter()
        wb = locked(base.load, group[0][2].base.name, device)
        local["read"] = time.perf_counter() - t0
        loaders = [(item, functools.partial(locked, ck.load, item.post.name, device), seq)
                   for _, ck, item, seq in group]
        try:
            return analyse_items(wb, loaders, opts, base.config, local, cache)
        finally:
            del wb, loaders
            release_memory()

    def finished(name: str, results: list, local: dict) -> Iterator[tuple[int, PairItem, tuple]]:
        if stages is not None:
            for k, v in local.items():
                stages[k] = stages.get(k, 0.0) + v
        for (key, ck, item, _), rows in zip(by_name[name], results):
            if hasattr(ck, "extra_rows"):           # a LoRA adapter: rank and exact low-rank spectrum
                with reading:
                    ck.extra_rows(item, rows, device)
            yield key, item, rows

    if workers <= 1 or len(names) <= 1:
        for name in names:
            local: dict[str, float] = {}
            yield from finished(name, analyse(name, local), local)
        return
    def weight(name: str) -> int:
        info = by_name[name][0][2].base
        return working_bytes(tuple(info.shape), info.nbytes)

    for name, results, local in run_ordered(names, analyse, weight, workers):
        yield from finished(name, results, local)


def release_memory() -> None:
    """Hand freed heap back to the OS after each tensor. glibc keeps large freed blocks in its
    arenas, so after the embedding the process would hold its peak for the rest of the run, and
    fragments from several large tensors add up (measured: RSS 1.6 GB held after a 151936×896 pair)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


class LocalExecutor:
    """The plain loop, in this process. Runs that share a base checkpoint and options are computed
    together: each base tensor is read and decomposed once for all of them (``compute_shared``).

    ``stages``: seconds by stage (read, elementwise, base_decomposition, update_decomposition,
    geometry), summed over every ``run`` call, for profiles (``bench/bench_engine.py``)."""

    name = "local"

    def __init__(self, device=None):
        self.device = device
        self.stages: dict[str, float] = {}

    def device_label(self, opts: AnalysisOptions) -> str:
        return str(self.device or resolve_device(opts.device))

    def run(self, works: list[Work], on_result: ResultSink, on_tasks: TaskSink | None = None) -> None:
        for group in group_by_base(works):
            w0 = group[0]
            device = self.device or resolve_device(w0.options.device)
            base = (w0.checkpoints[0] if w0.checkpoints
                    else Checkpoint.open(w0.base, allow_pickle=w0.options.allow_pickle))
            posts = []
            for w in group:
                post = (w.checkpoints[1] if w.checkpoints
                        else open_post(w.post, base, allow_pickle=w.options.allow_pickle))
                posts.append((w.key, post, w.items, w.seq))
            workers = tensor_workers(device, torch.get_num_threads())
            for key, item, rows in compute_shared(base, posts, w0.options, device, self.stages, w0.cache,
                                                  workers=workers):
                on_result(key, item.name, rows, pair_bytes(item))


def group_by_base(works: list[Work]) -> list[list[Work]]:
    """Works that can share their base work: the same base checkpoint (resolved path) and options, in
    the order of their first work."""
    groups: dict[tuple, list[Work]] = {}
    for w in works:
        groups.setdefault((str(Path(w.base).resolve()), w.options), []).append(w)
    return list(groups.values())
