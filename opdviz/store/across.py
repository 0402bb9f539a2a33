"""Reads across runs: the ``overlap`` table (mask overlap of two runs) and the ``trajectory`` table with
its per-step runs, written by ``opdviz.engine.overlap`` and ``opdviz.engine.trajectory``.

Counts are returned summed, never divided: ``opdviz.views.across`` derives every statistic from them,
so a group's value is numel-weighted by construction.
"""

from __future__ import annotations

import pandas as pd

from opdviz.store.core import Store
from opdviz.store.selection import Selection


# ------------------------------------------------------------------------------------ overlap
def overlap_pairs(store: Store, sel: Selection = Selection()) -> pd.DataFrame:
    """Stored pairs: run_a, run_b, method_a, method_b, n_tensors, criteria (count). With ``sel.runs``,
    only pairs that involve a selected run."""
    df = store.query("""SELECT o.run_a, o.run_b, ra.method AS method_a, rb.method AS method_b,
                               count(DISTINCT o.tensor) AS n_tensors, count(DISTINCT o.criterion) AS criteria
                        FROM overlap o LEFT JOIN runs ra ON ra.run_id = o.run_a
                        LEFT JOIN runs rb ON rb.run_id = o.run_b
                        GROUP BY ALL ORDER BY o.run_a, o.run_b""")
    if sel.runs and not df.empty:
        df = df[df["run_a"].isin(sel.runs) | df["run_b"].isin(sel.runs)]
    return df.reset_index(drop=True)


def overlap_counts(store: Store, run_a: str, run_b: str, criterion: str | None, keys: tuple[str, ...],
                   sel: Selection = Selection()) -> pd.DataFrame:
    """Counts of the pair summed per group of columns ``keys`` and criterion (every criterion when
    ``criterion`` is None): <keys>, criterion, n_tensors, numel, n_a, n_b, n_ab."""
    where, params = sel.shape_where("o")
    crit = ""
    if criterion is not None:
        crit = " AND o.criterion = ?"
        params = params + [criterion]
    kcols = "".join(f"o.{k}, " for k in keys)
    order = ", ".join([f"o.{k} NULLS FIRST" for k in keys] + ["o.criterion"])
    return store.query(f"""SELECT {kcols}o.criterion, count(*) AS n_tensors, sum(o.numel) AS numel,
                                sum(o.n_a) AS n_a, sum(o.n_b) AS n_b, sum(o.n_ab) AS n_ab
                         FROM overlap o WHERE o.run_a = ? AND o.run_b = ? AND {where}{crit}
                         GROUP BY {kcols}o.criterion ORDER BY {order}""", [run_a, run_b] + params)


# ------------------------------------------------------------------------------------ trajectory
def trajectories(store: Store) -> pd.DataFrame:
    """Trajectories: name, method, n_steps, first, last (from the per-step runs) and has_metrics
    (whether the trajectory table holds rows for it)."""
    return store.query("""SELECT r.trajectory, any_value(r.method) AS method, count(*) AS n_steps,
                               min(r.step) AS first, max(r.step) AS last,
                               EXISTS (SELECT 1 FROM trajectory t WHERE t.trajectory = r.trajectory) AS has_metrics
                        FROM runs r WHERE r.trajectory IS NOT NULL GROUP BY r.trajectory ORDER BY r.trajectory""")


def trajectory_steps(store: Store, name: str) -> pd.DataFrame:
    """The per-step runs of trajectory ``name``: run_id, step, by step."""
    return store.query("SELECT run_id, step FROM runs WHERE trajectory = ? ORDER BY step", [name])


def trajectory_metric_names(store: Store, name: str, prefix: str) -> list[str]:
    """The trajectory-table metrics of ``name`` that match the SQL LIKE pattern ``prefix%`` (e.g. ``sim_k``)."""
    df = store.query("SELECT DISTINCT metric FROM trajectory WHERE trajectory = ? AND metric LIKE ?",
                     [name, prefix + "%"])
    return list(df["metric"])


def trajectory_long(store: Store, name: str, sel: Selection = Selection(), metrics: tuple[str, ...] = ()) -> pd.DataFrame:
    """Trajectory-table rows of ``name`` joined with the tensor fields of the per-step runs: step, tensor,
    tower, layer, block, module, numel, metric, value."""
    where, params = Selection(towers=sel.towers, blocks=sel.blocks, modules=sel.modules, layer_min=sel.layer_min,
                              layer_max=sel.layer_max, leaves_only=False).where("t")
    mf = ""
    if metrics:
        mf = f" AND tr.metric IN ({', '.join('?' * len(metrics))})"
        params = params + list(metrics)
    return store.query(f"""SELECT tr.step, tr.tensor, t.tower, t.layer, t.block, t.module, t.numel, tr.metric, tr.value
        FROM trajectory tr JOIN runs r ON r.trajectory = tr.trajectory AND r.step = tr.step
        JOIN tensors t ON t.run_id = r.run_id AND t.tensor = tr.tensor
        WHERE tr.trajectory = ? AND {where}{mf} ORDER BY tr.step, t.seq, tr.tensor""", [name] + params)
