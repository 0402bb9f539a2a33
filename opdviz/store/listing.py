"""What a store holds, for choosers: selectable runs, filter facets, criteria, tensor names, counts.

The dashboard's sidebar and pages list their choices through these functions (cached per store stamp in
``opdviz.dashboard.cache``); the SQL stays in ``opdviz.store``. Each takes a ``Store`` and returns plain
values or a small DataFrame.
"""

from __future__ import annotations

import re

import pandas as pd

from opdviz.options import DEFAULT_CRITERIA
from opdviz.store import queries
from opdviz.store.core import Store
from opdviz.store.queries import Selection

# the stored sparsity_<criterion> names, in the order the sidebar lists them
_CRITERION_RE = re.compile(r"^sparsity_(exact|abs_[0-9.e+-]+|relrms_[0-9.e+-]+|bf16_[0-9.e+-]+)$")


def run_ids(store: Store) -> set[str]:
    """The names of the runs stored (none when the store does not exist yet)."""
    return set(queries.runs(store)["run_id"]) if store.exists() else set()


def facets(store: Store) -> pd.DataFrame:
    """Distinct (run_id, tower, block, module, layer) of the analysed tensors: the sidebar's filter values."""
    return store.query("SELECT DISTINCT run_id, tower, block, module, layer FROM tensors WHERE status = 'ok'")


def criteria(store: Store) -> list[str]:
    """The "changed" criteria stored (``sparsity_<criterion>`` metrics), default order first; the default
    criteria when none is stored."""
    found = [m[len("sparsity_"):] for m in queries.metric_names(store) if _CRITERION_RE.match(m)]
    order = {c: i for i, c in enumerate(DEFAULT_CRITERIA)}
    return sorted(found, key=lambda c: (order.get(c, len(order)), c)) or list(DEFAULT_CRITERIA)


def tensor_names(store: Store, sel: Selection, two_d: bool) -> list[str]:
    """Distinct tensor names in ``sel``, in storage order; ``two_d``: matrices only."""
    df = queries.tensors(store, sel)
    if two_d:
        df = df[df["cols"].notna()]
    return list(dict.fromkeys(df["tensor"]))


def largest_tensor(store: Store, sel: Selection) -> str | None:
    """The Tensor page's default: the largest matrix inside a layer (else the largest matrix)."""
    df = queries.tensors(store, sel)
    df = df[df["cols"].notna()]
    if df.empty:
        return None
    df = df.assign(no_layer=df["layer"].isna())
    return str(df.sort_values(["no_layer", "numel", "seq"], ascending=[True, False, True])["tensor"].iloc[0])


def not_ok(store: Store) -> dict[str, pd.DataFrame]:
    """Run id → the run's tensors that were skipped or failed: status, reason and, when the run recorded
    failures, their stage and error. Runs with none are left out. Two queries for every run at once."""
    bad = store.query("""SELECT run_id, tensor, status, reason FROM tensors WHERE status IS DISTINCT FROM 'ok'
                         ORDER BY run_id, seq, tensor""")
    fails = dict(iter(queries.failures(store).groupby("run_id", sort=False)))
    out = {}
    for run_id, df in bad.groupby("run_id", sort=False):
        df = df[["tensor", "status", "reason"]]
        f = fails.get(run_id)
        if f is not None:
            df = df.merge(f[["tensor", "stage", "error", "message"]], on="tensor", how="left")
        out[run_id] = df.reset_index(drop=True)
    return out


def n_top_done(store: Store, run_id: str) -> int:
    """How many whole tensors (not parts of fused ones) of a run are stored."""
    df = store.query("SELECT count(*) AS n FROM tensors WHERE run_id = ? AND coalesce(parent, '') = ''", [run_id])
    return int(df["n"].iloc[0])
