"""Several tensors analysed at once (opdviz.engine.parallel): order, limits, thread counts, errors, results."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch

import factory
from opdviz.engine import local, parallel
from opdviz.engine.local import LocalExecutor, compute_shared
from opdviz.engine.parallel import EXCLUSIVE_BYTES, WORKERS_ENV, run_ordered, tensor_workers, working_bytes
from opdviz.errors import OptionsError
from opdviz.io.reader import Checkpoint, plan_pairs
from opdviz.options import AnalysisOptions


class Recorder:
    """Fake tasks: random durations; records what ran at once and on how many torch threads."""

    def __init__(self, seed=0):
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.overlaps: list[set[str]] = []
        self.threads: dict[str, int] = {}
        self.started: list[str] = []
        self.rng = random.Random(seed)

    def __call__(self, name: str, clock=None):
        with self.lock:
            self.running.add(name)
            self.overlaps.append(set(self.running))
            self.started.append(name)
            self.threads[name] = torch.get_num_threads()
            delay = self.rng.random() * 0.02
        time.sleep(delay)
        with self.lock:
            self.running.discard(name)
        return name.upper()


def _weights(names, big=()):
    return lambda n: EXCLUSIVE_BYTES if n in big else 1


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_results_come_in_order_and_big_tensors_run_alone(two_threads):
    names = [f"t{i:02d}" for i in range(30)]
    big = {"t00", "t07", "t29"}
    rec = Recorder()
    out = list(run_ordered(names, rec, _weights(names, big), workers=2))
    assert [(n, v) for n, v, _ in out] == [(n, n.upper()) for n in names]
    assert rec.started == names                                  # admitted in the job's order
    assert max(len(s) for s in rec.overlaps) == 2                # two at once did happen ...
    for s in rec.overlaps:
        assert len(s) <= 2 and (len(s) == 1 or not s & big)      # ... never more, never beside a big one
    # every tensor on a thread count that depends on it alone: the big ones on all threads, the rest on half
    assert {n: rec.threads[n] for n in big} == {n: 2 for n in big}
    assert {rec.threads[n] for n in names if n not in big} == {1}
    assert torch.get_num_threads() == 2                          # the caller's count is back


def test_an_error_arrives_in_order_and_stopping_starts_no_more(two_threads):
    names = [f"t{i:02d}" for i in range(20)]

    def task(name, clock):
        time.sleep(0.002)
        if name == "t05":
            raise ValueError("bad tensor t05")
        return name

    got = []
    with pytest.raises(ValueError, match="t05"):
        for name, value, _ in run_ordered(names, task, _weights(names), workers=2):
            got.append(value)
    assert got == names[:5]

    # a stopped job starts no more tensors, and those in flight stop at the end of their current stage
    stages_done: dict[str, int] = {}

    def staged(name, clock):
        for i in range(40):                       # 40 stages of 10 ms: 0.4 s a tensor
            time.sleep(0.01)
            stages_done[name] = i + 1
            clock[f"stage{i}"] = 0.01
        return name

    it = run_ordered(names, staged, _weights(names), workers=2)
    assert next(it)[:2] == ("t00", "t00")
    t0 = time.perf_counter()
    it.close()
    assert time.perf_counter() - t0 < 0.35                      # not the 0.4 s of a whole tensor
    started = dict(stages_done)
    time.sleep(0.1)
    assert stages_done == started and len(started) < len(names)
    assert [n for n, k in started.items() if k < 40]            # the tensor in flight was cut short
    assert torch.get_num_threads() == 2


def test_what_runs_alone():
    """Alone: a vocabulary matrix, and every matrix of a model of hidden size 2048 or more (its float64
    factors); beside another: the matrices of smaller models, vectors."""
    def alone(shape, itemsize=2):
        return working_bytes(shape, itemsize * int(np.prod(shape))) >= EXCLUSIVE_BYTES

    assert alone((151936, 896)) and alone((32000, 4096)) and alone((4096, 4096)) and alone((2048, 2048))
    assert not alone((4864, 896)) and not alone((896, 4864)) and not alone((8960, 1536))    # 0.5B, 1.5B FFN
    assert not alone((896,)) and not alone((8, 896, 512))        # a bias; a stack of small experts
    assert alone((8, 4096, 14336))                               # Mixtral's experts


def test_worker_count(monkeypatch):
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert tensor_workers("cpu", 2) == 2 and tensor_workers("cpu", 16) == 2
    assert tensor_workers("cpu", 1) == 1
    assert tensor_workers(torch.device("cuda"), 8) == 1          # one tensor at a time on a GPU
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert tensor_workers("cpu", 2) == 1
    monkeypatch.setenv(WORKERS_ENV, "4")
    assert tensor_workers("cpu", 16) == 4 and tensor_workers("cpu", 3) == 3
    monkeypatch.setenv(WORKERS_ENV, "two")
    with pytest.raises(OptionsError, match=WORKERS_ENV):
        tensor_workers("cpu", 2)


CFG = factory.llama_config(layers=2, hidden=96, ffn=256, heads=4, kv_heads=2, vocab=700)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    base = factory.make_llama_state(CFG, seed=5)
    b = factory.save_checkpoint(base, root / "base", shards=2, config=CFG)
    posts = [factory.save_checkpoint(factory.post_train(base, seed=20 + i, density=0.2 + 0.3 * i),
                                     root / f"post{i}", shards=1, config=CFG) for i in range(2)]
    return b, posts


def _rows(base_dir, post_dirs, workers, threads):
    opts = AnalysisOptions()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with Checkpoint.open(base_dir) as b:
            posts = []
            for k, p in enumerate(post_dirs):
                ck = Checkpoint.open(p)
                items = plan_pairs(b, ck)
                posts.append((k, ck, items, {i.name: s for s, i in enumerate(items)}))
            out = [(key, item.name, rows) for key, item, rows in
                   compute_shared(b, posts, opts, torch.device("cpu"), workers=workers)]
            for _, ck, _, _ in posts:
                ck.close()
    finally:
        torch.set_num_threads(before)
    return out


def _identical(a, b):
    assert [(k, n) for k, n, _ in a] == [(k, n) for k, n, _ in b]
    for (_, name, ra), (_, _, rb) in zip(a, b):
        ta, ma, aa, fa = ra
        tb, mb, ab, fb = rb
        assert not fa and not fb, (fa, fb)
        assert [(m["tensor"], m["metric"]) for m in ma] == [(m["tensor"], m["metric"]) for m in mb]
        np.testing.assert_array_equal([m["value"] for m in ma], [m["value"] for m in mb], err_msg=name)
        assert [(x["tensor"], x["name"]) for x in aa] == [(x["tensor"], x["name"]) for x in ab]
        for x, y in zip(aa, ab):
            np.testing.assert_array_equal(np.asarray(x["values"], float), np.asarray(y["values"], float),
                                          err_msg=f"{name} {x['name']}")


def test_a_tensor_is_computed_the_same_beside_others_as_alone(family, monkeypatch):
    """Two posts, tensors two at once with random delays (other interleavings): bitwise the rows of one
    tensor at a time on the same thread count — half the threads for most, all of them for the big ones."""
    base, posts = family
    real = local.analyse_items
    rng = random.Random(1)

    def jittered(*args, **kwargs):
        time.sleep(rng.random() * 0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(local, "analyse_items", jittered)
    together = _rows(base, posts, workers=2, threads=2)
    assert len({n for _, n, _ in together}) > 10
    _identical(together, _rows(base, posts, workers=1, threads=1))       # every tensor on one thread each
    monkeypatch.setattr(parallel, "EXCLUSIVE_BYTES", 1)                  # every tensor "big": alone, 2 threads
    _identical(_rows(base, posts, workers=2, threads=2), _rows(base, posts, workers=1, threads=2))


def test_the_local_executor_analyses_two_at_once_on_cpu(family, monkeypatch, two_threads):
    seen = []
    real = local.compute_shared

    def spy(*args, workers=1, **kwargs):
        seen.append(workers)
        return real(*args, workers=workers, **kwargs)

    monkeypatch.setattr(local, "compute_shared", spy)
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    from opdviz.engine.runner import JobSpec, run_jobs

    base, posts = family
    db = family[0].parent / "executor.duckdb"
    spec = JobSpec(base=base, post=posts[0], run_id="p", method="OPD", db=db, options=AnalysisOptions())
    assert run_jobs([spec], progress=False, executor=LocalExecutor())[0]["status"] == "done"
    assert seen == [2]
