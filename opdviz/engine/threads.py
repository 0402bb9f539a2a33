"""CPU threads of the job: passive OpenMP waiting and a thread count the job chooses.

On a machine whose cores are shared, torch's OpenMP threads spin while they wait for work and starve
each other and everyone else (measured on 2 cores at load 3: a float64 Gram/eigen pass 25.8 s with the
default policy, 3.7 s with ``OMP_WAIT_POLICY=PASSIVE``). The policy is read once, when torch starts
OpenMP, so ``passive_wait`` must run before ``import torch``: the ``opdviz`` command calls it first
thing, and ``child_env`` puts it into the environment of the processes a job starts (queue workers,
compute children, Ray workers). An operator's own ``OMP_WAIT_POLICY`` is kept.

Thread count: ``--threads N``, else ``$OPDVIZ_THREADS``, else the cores this process may run on
(``os.sched_getaffinity``: a container's or ``taskset``'s limit, not the machine's core count).
"""

from __future__ import annotations

import os

from opdviz.errors import OptionsError

THREADS_ENV = "OPDVIZ_THREADS"
WAIT_POLICY = "PASSIVE"


def passive_wait(env: dict | None = None) -> dict:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``env`` (default: this process's environment) unless set."""
    env = os.environ if env is None else env
    env.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    return env


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):       # not Linux
        return max(1, os.cpu_count() or 1)


def choose_threads(requested: int | None = None) -> int:
    """The job's torch thread count: ``requested`` (``--threads``), else ``$OPDVIZ_THREADS``, else
    ``available_cores()``. Raises OptionsError for a count below 1 or a malformed variable."""
    if requested is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        if text:
            try:
                requested = int(text)
            except ValueError:
                raise OptionsError(f"${THREADS_ENV} must be a whole number of threads, not {text!r}") from None
    if requested is None:
        return available_cores()
    if requested < 1:
        raise OptionsError(f"the thread count must be ≥ 1, got {requested} (--threads / ${THREADS_ENV})")
    return requested


def apply_threads(requested: int | None = None) -> int:
    """Choose the thread count (``choose_threads``) and give it to torch; returns it."""
    import torch

    n = choose_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def child_env(env: dict | None = None) -> dict:
    """A copy of ``env`` (default: this process's) for a child process, with passive OpenMP waiting
    unless the operator set a policy (``$OPDVIZ_THREADS`` passes through unchanged)."""
    return passive_wait(dict(os.environ if env is None else env))
