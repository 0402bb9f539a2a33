"""What is already stored for a job: the queries the engine asks before and after computing.

A job resumes by skipping what the store holds: the tensors of a run (``tensors`` table), the tensors of
an overlap (``overlap``) or of a trajectory (``trajectory``). These functions answer those questions so
that the engine (``opdviz.engine``) and the CLI speak no SQL; the store's readers are in
``opdviz.store.queries``.
"""

from __future__ import annotations

import pandas as pd

from opdviz.store.core import Store


def run_stored(store: Store, run_id: str) -> tuple[set[str], dict[str, int]]:
    """(names of the stored tensors of ``run_id`` — parents and parts —, top-level tensors by status):
    what a resume does not recompute, and the counts it starts from."""
    df = store.query("SELECT tensor, parent, status FROM tensors WHERE run_id = ?", [run_id])
    counts = df[df["parent"] == ""]["status"].value_counts().to_dict()
    return set(df["tensor"]), {k: int(v) for k, v in counts.items()}


def run_status_counts(store: Store, run_id: str, *, timeout: float = 10.0) -> dict[str, int]:
    """Top-level tensors of ``run_id`` stored, by status (ok / skipped / failed)."""
    df = store.query("SELECT status, count(*) AS n FROM tensors WHERE run_id = ? AND parent = '' "
                     "GROUP BY status", [run_id], timeout=timeout)
    return {s: int(c) for s, c in zip(df["status"], df["n"])}


def overlap_criteria(store: Store, run_a: str, run_b: str) -> set[str]:
    """Criteria under which the overlap of runs A and B is stored (empty: none stored)."""
    df = store.query("SELECT DISTINCT criterion FROM overlap WHERE run_a = ? AND run_b = ?", [run_a, run_b])
    return set(df["criterion"])


def overlap_done(store: Store, run_a: str, run_b: str) -> set[str]:
    """Tensors whose overlap of runs A and B is stored."""
    df = store.query("SELECT DISTINCT tensor FROM overlap WHERE run_a = ? AND run_b = ?", [run_a, run_b])
    return set(df["tensor"])


def overlap_pairs(store: Store) -> set[tuple[str, str]]:
    """(run_a, run_b) of every stored overlap."""
    df = store.query("SELECT DISTINCT run_a, run_b FROM overlap")
    return set(zip(df["run_a"], df["run_b"]))


def trajectory_stored(store: Store, name: str) -> tuple[set[int], set[str]]:
    """(steps, metric names) stored for trajectory ``name`` (both empty: none stored)."""
    df = store.query("SELECT DISTINCT step, metric FROM trajectory WHERE trajectory = ?", [name])
    return set(df["step"]), set(df["metric"])


def trajectory_done(store: Store, name: str) -> set[str]:
    """Tensors whose trajectory metrics of ``name`` are stored."""
    df = store.query("SELECT DISTINCT tensor FROM trajectory WHERE trajectory = ?", [name])
    return set(df["tensor"])


def trajectory_names(store: Store) -> set[str]:
    """Names of every stored trajectory (its metrics table, not its step runs)."""
    return set(store.query("SELECT DISTINCT trajectory FROM trajectory")["trajectory"])


def trajectory_run_extras(store: Store, name: str) -> pd.DataFrame:
    """step, extra (JSON text) of the step runs of trajectory ``name``, ascending steps."""
    return store.query("SELECT step, extra FROM runs WHERE trajectory = ? ORDER BY step", [name])
