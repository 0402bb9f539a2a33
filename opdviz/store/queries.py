"""Read-side queries over the store's runs, tensors, metrics and arrays: DataFrames for the dashboard,
the CLI, the Python API and exports.

Only ``opdviz.store`` speaks SQL: these per-run reads, the group aggregates (``opdviz.store.summary``), the
overlap and trajectory reads (``opdviz.store.across``) and the lab sweep's (``opdviz.store.lab``). Functions
take a ``Store`` and, where a page filters, a ``Selection``, and return a pandas DataFrame.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from opdviz.store.core import Store
from opdviz.store.locks import computing
from opdviz.store.schema import ARRAY_KEY, array_key, physical
from opdviz.store.selection import Selection


def runs(store: Store) -> pd.DataFrame:
    """One row per run, newest status, ordered by creation. A run stored as ``running`` whose process is
    gone (killed, machine restarted: see ``store.computing``) reads as ``interrupted``, with why."""
    df = store.query("SELECT * FROM runs ORDER BY created_at, run_id")
    unfinished = df.index[df["status"].isin(["running", "interrupted", "failed"])]
    # the run row of a killed job still holds the count it started with: count what is really stored
    stored = store.stored_counts() if len(unfinished) else {}
    for i in unfinished:
        df.loc[i, "n_done"] = stored.get(df.at[i, "run_id"], 0)
    for i in df.index[df["status"] == "running"]:
        if computing(store, df.at[i, "run_id"]) is False:
            df.loc[i, "status"] = "interrupted"
            df.loc[i, "error"] = (f"interrupted after {int(df.at[i, 'n_done'] or 0)} of "
                                  f"{int(df.at[i, 'n_tensors'] or 0)} tensors: its process is gone (killed, or the "
                                  "machine restarted); rerun the same command, or Resume, to continue")
    return df


def tensors(store: Store, sel: Selection = Selection()) -> pd.DataFrame:
    """Tensor rows (with parsed fields) matching ``sel``, with the run's method."""
    where, params = sel.where("t")
    return store.query(f"""SELECT t.*, r.method FROM tensors t LEFT JOIN runs r USING (run_id)
                           WHERE {where} ORDER BY t.run_id, t.seq, t.tensor""", params)


def failures(store: Store, run_id: str | None = None) -> pd.DataFrame:
    if run_id is None:
        return store.query("SELECT * FROM failures ORDER BY run_id, tensor")
    return store.query("SELECT * FROM failures WHERE run_id = ? ORDER BY tensor", [run_id])


def metric_names(store: Store, run_ids: tuple[str, ...] = ()) -> list[str]:
    """Distinct scalar metric names present for the runs."""
    if run_ids:
        df = store.query(f"SELECT DISTINCT metric FROM metrics WHERE run_id IN ({', '.join('?' * len(run_ids))})",
                         list(run_ids))
    else:
        df = store.query("SELECT DISTINCT metric FROM metrics")
    return sorted(df["metric"])


def long_metrics(store: Store, sel: Selection = Selection(), metrics: tuple[str, ...] = ()) -> pd.DataFrame:
    """Long table: run_id, method, tensor, tower, layer, block, module, expert, part, numel, metric, value."""
    where, params = sel.where("t")
    mfilter = ""
    if metrics:
        mfilter = f" AND m.metric IN ({', '.join('?' * len(metrics))})"
        params = params + list(metrics)
    return store.query(f"""
        SELECT t.run_id, r.method, t.tensor, t.tower, t.layer, t.block, t.module, t.expert, t.part,
               t.numel, t.rows, t.cols, m.metric, m.value
        FROM tensors t JOIN metrics m USING (run_id, tensor) LEFT JOIN runs r USING (run_id)
        WHERE {where}{mfilter}
        ORDER BY t.run_id, t.seq, t.tensor, m.metric""", params)


def wide_metrics(store: Store, sel: Selection = Selection(), metrics: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per tensor, one column per metric."""
    df = long_metrics(store, sel, metrics)
    index = ["run_id", "method", "tensor", "tower", "layer", "block", "module", "expert", "part", "numel",
             "rows", "cols"]
    if df.empty:
        return pd.DataFrame(columns=index + list(metrics))
    values = df.pivot_table(index=["run_id", "tensor"], columns="metric", values="value", aggfunc="first")
    values.columns.name = None
    fields = df[index].drop_duplicates(["run_id", "tensor"])
    return fields.merge(values.reset_index(), on=["run_id", "tensor"], how="left")


def array(store: Store, run_id: str, tensor: str, name: str) -> np.ndarray | None:
    """One stored array, reshaped to its stored shape; None when absent."""
    df = store.query("SELECT shape, \"values\" FROM arrays WHERE run_id = ? AND tensor = ? AND name = ?",
                     [run_id, tensor, name])
    if df.empty:
        return None
    values = np.asarray(df.iloc[0]["values"], dtype=np.float64)
    shape = tuple(int(s) for s in df.iloc[0]["shape"])
    return values.reshape(shape) if shape else values


def arrays_long(store: Store, sel: Selection, name: str) -> pd.DataFrame:
    """All arrays called ``name`` for the selection: tensor fields (run_id, method, tensor, layer, block,
    module, numel, rows, cols) plus ``shape`` and a ``values`` list column."""
    where, params = sel.where("t")
    return store.query(f"""
        SELECT t.run_id, r.method, t.tensor, t.layer, t.block, t.module, t.numel, t.rows, t.cols, a.shape,
               a."values"
        FROM tensors t JOIN arrays a USING (run_id, tensor) LEFT JOIN runs r USING (run_id)
        WHERE {where} AND a.name = ? ORDER BY t.run_id, t.seq, t.tensor""", params + [name])


def tensor_arrays(store: Store, sel: Selection, tensors: tuple[str, ...]) -> pd.DataFrame:
    """Every stored array of ``tensors`` (parts included) in the selected runs, with tensor fields.

    One read for a page's drill-down, whose figures share it. DuckDB decodes list columns 2048 rows at a
    time, so a scan that keeps a few arrays still decodes nearly the whole ``values`` column of the file
    (about 1 s on a 673 MB sweep); it fetches only the rows asked for through the index on the array
    tables' ``run_tensor`` key (``schema.INDEXES``), and only for a filter on the key alone (a filter on the
    runs and tensors, or a join, makes it scan). So the selection's tensor fields come from a small first
    query, their keys select the arrays from the file, and the two are joined here. When more rows match
    than DuckDB fetches through an index, a job has staged results not folded yet, or the store predates the
    index, one join that keeps the selected runs' rows (through the views) gives the same rows."""
    cols = ["run_id", "method", "tensor", "layer", "block", "module", "numel", "rows", "cols", "name", "shape",
            "values"]
    if not tensors:
        return pd.DataFrame(columns=cols)
    where, params = replace(sel, leaves_only=False).where("t")
    marks = ", ".join("?" * len(tensors))
    fields = store.query(f"""
        SELECT t.run_id, r.method, t.tensor, t.layer, t.block, t.module, t.numel, t.rows, t.cols, t.seq
        FROM tensors t LEFT JOIN runs r USING (run_id)
        WHERE {where} AND t.tensor IN ({marks})""", params + list(tensors))
    keys = [array_key(r, t) for r, t in zip(fields["run_id"], fields["tensor"])]
    arrays = _arrays_by_key(store, keys) if keys else None
    if arrays is None:
        return store.query(f"""
            SELECT t.run_id, r.method, t.tensor, t.layer, t.block, t.module, t.numel, t.rows, t.cols, a.name,
                   a.shape, a."values"
            FROM tensors t JOIN arrays a USING (run_id, tensor) LEFT JOIN runs r USING (run_id)
            WHERE {where} AND t.tensor IN ({marks})
            ORDER BY t.run_id, t.seq, t.tensor, a.name""", params + list(tensors))
    df = fields.merge(arrays, on=["run_id", "tensor"])
    return df.sort_values(["run_id", "seq", "tensor", "name"], kind="stable", ignore_index=True)[cols]


def _arrays_by_key(store: Store, keys: list[str]) -> pd.DataFrame | None:
    """(run_id, tensor, name, shape, values) of the stored arrays whose ``run_tensor`` key is in ``keys``,
    read from both array tables of the file through their key index; None when the file has no such index
    or a job has staged tensors (``tensor_arrays`` then reads through the views). More matching rows than
    ``INDEX_SCAN_ROWS`` make DuckDB scan instead, which is no slower than the join."""
    if not store.has_indexes() or store.staged_tensors():
        return None
    marks = ", ".join("?" * len(keys))
    sql = " UNION ALL ".join(f'SELECT run_id, tensor, name, shape, "values" FROM db.main.{name} '
                             f"WHERE {ARRAY_KEY} IN ({marks})" for name in physical("arrays"))
    return store.query(sql, keys * len(physical("arrays")))


EXPORT_COLUMNS = ("run", "method", "tensor", "tower", "layer", "block", "module", "metric", "value")


def export_rows(store: Store, run_id: str | None = None, *, runs=(), methods=(), towers=(), layers=(), blocks=(),
                modules=(), metrics=()) -> pd.DataFrame:
    """The stable export: one row per (tensor, metric) with columns ``EXPORT_COLUMNS``
    run, method, tensor, tower, layer (nullable int), block, module, metric, value (every ok tensor, parts
    included). ``opdviz metrics`` and ``opdviz.open(db).metrics(...)`` both return exactly this.

    Filters (empty = all): runs, methods, towers, layers (tensors without a layer drop out when given),
    blocks, modules, and metrics — exact names, or globs with ``*``/``?``/``[...]``."""
    where, params = "t.status = 'ok'", []
    runs = tuple(runs) + ((run_id,) if run_id is not None else ())
    for col, values in (("t.run_id", runs), ("r.method", methods), ("t.tower", towers), ("t.layer", layers),
                        ("t.block", blocks), ("t.module", modules)):
        if values:
            where += f" AND {col} IN ({', '.join('?' * len(values))})"
            params.extend(values)
    if metrics:
        exact = [m for m in metrics if not any(c in m for c in "*?[")]
        globs = [m for m in metrics if m not in exact]
        terms = ([f"m.metric IN ({', '.join('?' * len(exact))})"] if exact else []) + ["m.metric GLOB ?"] * len(globs)
        where += " AND (" + " OR ".join(terms) + ")"
        params.extend(exact + globs)
    df = store.query(f"""
        SELECT t.run_id AS run, r.method, t.tensor, t.tower, t.layer, t.block, t.module, m.metric, m.value
        FROM tensors t JOIN metrics m USING (run_id, tensor) LEFT JOIN runs r USING (run_id)
        WHERE {where}
        ORDER BY t.run_id, t.seq, t.tensor, m.metric""", params)
    df = df[list(EXPORT_COLUMNS)]
    df["layer"] = df["layer"].astype("Int64")
    return df


def selection_values(store: Store) -> dict[str, set]:
    """What ``export_rows`` can select: the runs, methods, towers, layers, blocks, modules and metric names
    of ok tensors in the store (for messages that list the valid values)."""
    facets = store.query("""SELECT DISTINCT t.run_id, r.method, t.tower, t.layer, t.block, t.module
                            FROM tensors t LEFT JOIN runs r USING (run_id) WHERE t.status = 'ok'""")
    out = {"runs": set(store.query("SELECT run_id FROM runs")["run_id"]),
           "methods": set(facets["method"].dropna()), "towers": set(facets["tower"].dropna()),
           "layers": {int(x) for x in facets["layer"].dropna()}, "blocks": set(facets["block"].dropna()),
           "modules": set(facets["module"].dropna()), "metrics": set(metric_names(store))}
    return out
