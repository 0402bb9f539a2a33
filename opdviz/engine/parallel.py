"""Several base tensors analysed at once on CPU, results in order.

Why: most of a tensor's exact analysis barely uses a second core. LAPACK's eigen-solvers of the 896-wide
Grams run as fast on one thread as on two (measured on 2 cores: eigh 176 → 174 ms, eigvalsh 86 → 111 ms
from 1 to 2 threads), the row-chunked float64 Grams gain 1.3×, and the elementwise passes are numpy on
one core. So on CPU a job analyses ``workers`` tensors at once (``tensor_workers``), each in its own
thread on ``threads // workers`` torch threads, and hands the results on in the job's order.

What stays as before:

- **Results.** Which thread count a tensor is computed with depends only on the tensor (its bytes), the
  job's thread count and the device, never on what else runs beside it: a tensor is computed the same
  in a fresh job, a resumed one, a Ray task, or a job of one pair or of many posts (float64 BLAS sums
  depend on the thread count in the last bits).
- **Memory.** A tensor whose analysis needs ``EXCLUSIVE_BYTES`` or more (``working_bytes``: its bytes plus
  the float64 n×n matrices of the exact analysis; a vocabulary matrix, or every matrix of a model of
  hidden size 2048 or more) is analysed alone, on every thread. Two smaller ones at once need at most
  2 × 256 MiB beside the fixed buffers, so the peak stays about that of one large tensor. Large n is
  also where a second thread pays off inside LAPACK and BLAS.
- **Order.** Tensors start in the job's order (admission by ticket) and their results are yielded in
  it; at most ``LOOKAHEAD`` finished results wait for an earlier one.

``torch.set_num_threads`` is per thread for OpenMP and MKL (a new thread takes the last count set
anywhere), so each task sets its own count first, and the caller's count is restored at the end.

A stopped job (Ctrl+C, SIGTERM from a cancel, an error) does not wait for the tensors in flight to
finish: each task's stage clock (``StageClock``, the ``stages`` profile its metrics fill in) raises
``Stopped`` at the end of its current stage, so stopping waits for at most one stage of each.
"""

from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

EXCLUSIVE_BYTES = 256 << 20    # a tensor whose analysis needs this much is analysed alone, on every thread
# float64 n×n matrices alive at once in the exact analysis of an m×n matrix, in bytes per n²: measured peak RSS
# growth of one pair 1024² 174 MiB, 2048² 471 MiB, 5632×2048 375 MiB ≈ 100 MiB of fixed buffers + 12 n² doubles
FACTOR_BYTES_PER_N2 = 96
LOOKAHEAD = 8                  # tasks submitted ahead of the first unfinished one
WORKERS_ENV = "OPDVIZ_TENSOR_WORKERS"


def working_bytes(shape: tuple[int, ...], nbytes: int) -> int:
    """The memory one tensor's analysis needs beside the fixed buffers: its bytes plus
    ``FACTOR_BYTES_PER_N2``·n² for the factors of its matrix (n: the smaller side of the matrix view; of
    one expert's matrix for a 3-D stack)."""
    if len(shape) < 2:
        return nbytes
    if len(shape) == 2:
        n = min(shape[0], shape[1])
    else:
        n = min(shape[-2], shape[-1])
    return nbytes + FACTOR_BYTES_PER_N2 * n * n


def tensor_workers(device, threads: int) -> int:
    """Tensors analysed at once by a job on ``device`` with ``threads`` torch threads: 2 on CPU with two
    threads or more, else 1. ``$OPDVIZ_TENSOR_WORKERS`` (an operator's setting) can make it 1, or more
    than 2 on a machine with many cores (each then gets ``threads // workers`` threads)."""
    import torch

    if torch.device(device).type != "cpu" or threads < 2:
        return 1
    text = os.environ.get(WORKERS_ENV, "").strip()
    if text:
        try:
            return max(1, min(int(text), threads))
        except ValueError:
            from opdviz.errors import OptionsError

            raise OptionsError(f"${WORKERS_ENV} must be a whole number of tensors, not {text!r}") from None
    return 2


class Stopped(BaseException):
    """Raised inside a task at the end of a stage once the job stops (not an ``Exception``: the per-tensor
    error handling, which records failures and goes on, lets it through)."""


class StageClock(dict):
    """Seconds by stage of one task (the ``stages`` dict of ``analyse_items``), and its stop points:
    once ``stop`` is set, recording the end of a stage raises ``Stopped``."""

    def __init__(self, stop: threading.Event):
        super().__init__()
        self.stop = stop

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if self.stop.is_set():
            raise Stopped


class _Gate:
    """Admits tasks strictly in ticket order: an exclusive one when nothing runs, a shared one while fewer
    than ``workers`` shared ones run and no exclusive one does."""

    def __init__(self, workers: int):
        self.workers = workers
        self.cond = threading.Condition()
        self.next = 0
        self.running = 0
        self.exclusive = False
        self.closed = False

    def enter(self, ticket: int, exclusive: bool) -> bool:
        with self.cond:
            while not self.closed and not (ticket == self.next and (
                    (exclusive and self.running == 0)
                    or (not exclusive and not self.exclusive and self.running < self.workers))):
                self.cond.wait()
            if self.closed:
                return False
            self.next += 1
            self.running += 1
            self.exclusive = exclusive
            self.cond.notify_all()
            return True

    def leave(self) -> None:
        with self.cond:
            self.running -= 1
            self.exclusive = False
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def run_ordered(names: list[str], task: Callable[[str, StageClock], object], weight: Callable[[str], int],
                workers: int) -> Iterator[tuple[str, object, StageClock]]:
    """Yield (name, task(name, clock), clock) for each name, in order, computing ``workers`` at once (see
    the module docstring); ``weight(name)``: its ``working_bytes``; ``clock``: the task's stage
    times. An exception of a task is raised here, in order, after the tasks before it were yielded;
    stopping the iteration starts no more tasks and stops the running ones at the end of their stage."""
    import torch

    threads = torch.get_num_threads()
    shared_threads = max(1, threads // workers)
    gate = _Gate(workers)
    stop = threading.Event()

    def run(ticket: int, name: str):
        exclusive = weight(name) >= EXCLUSIVE_BYTES
        if not gate.enter(ticket, exclusive):
            return None
        try:
            torch.set_num_threads(threads if exclusive else shared_threads)
            clock = StageClock(stop)
            return task(name, clock), clock
        finally:
            gate.leave()

    pending: collections.deque = collections.deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="opdviz-tensor")
    try:
        nxt = 0
        while nxt < len(names) or pending:
            while nxt < len(names) and len(pending) < workers + LOOKAHEAD:
                pending.append((names[nxt], pool.submit(run, nxt, names[nxt])))
                nxt += 1
            name, fut = pending.popleft()
            yield (name, *fut.result())
    finally:
        stop.set()
        gate.close()
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
