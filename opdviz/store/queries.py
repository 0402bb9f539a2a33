"""Read-side queries over the store: DataFrames for the dashboard, the CLI and exports.

Only this module and ``opdviz.store.core`` speak SQL. Every function takes a ``Store`` and a
``Selection`` (which runs, towers, layers, blocks, modules) and returns a pandas DataFrame.

Aggregation rules: every catalog metric is pooled over a group by its own rule (``pool_sql``, from the
catalog's ``agg``: parameter-, changed- or energy-weighted, pooled sums, or the mean over matrices); fused
tensors are counted once — through their parts when they were split (``parent`` rows with parts are not
"leaves"), else whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from opdviz.options import LAB_CRITERIA
from opdviz.store.core import Store, computing

GROUP_KEYS = {
    "run": (),
    "layer": ("layer",),
    "module": ("block", "module"),
    "block": ("block",),
    "layer_module": ("layer", "block", "module"),
    "tensor": ("tensor", "layer", "block", "module"),
}


@dataclass(frozen=True)
class Selection:
    """Which rows a query covers. Empty tuples mean 'all'."""

    runs: tuple[str, ...] = ()
    towers: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    layer_min: int | None = None
    layer_max: int | None = None
    leaves_only: bool = True          # count fused tensors once (through their parts)
    extra: tuple[str, ...] = field(default=())   # tensor-name substrings to keep (any)

    def where(self, alias: str = "t") -> tuple[str, list]:
        """SQL predicate over the ``tensors`` view aliased ``alias``, with its parameters."""
        clauses, params = [f"{alias}.status = 'ok'"], []
        for col, values in (("run_id", self.runs), ("tower", self.towers), ("block", self.blocks),
                            ("module", self.modules)):
            if values:
                clauses.append(f"{alias}.{col} IN ({', '.join('?' * len(values))})")
                params.extend(values)
        if self.layer_min is not None:
            clauses.append(f"({alias}.layer IS NULL OR {alias}.layer >= ?)")
            params.append(int(self.layer_min))
        if self.layer_max is not None:
            clauses.append(f"({alias}.layer IS NULL OR {alias}.layer <= ?)")
            params.append(int(self.layer_max))
        if self.leaves_only:
            clauses.append(f"NOT EXISTS (SELECT 1 FROM tensors c WHERE c.run_id = {alias}.run_id "
                           f"AND c.parent = {alias}.tensor AND c.status = 'ok')")
        if self.extra:
            clauses.append("(" + " OR ".join(f"{alias}.tensor LIKE ?" for _ in self.extra) + ")")
            params.extend(f"%{s}%" for s in self.extra)
        return " AND ".join(clauses), params


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


def all_tensors(store: Store, run_id: str) -> pd.DataFrame:
    """Every tensor row of a run, whatever its status (skipped and failed included)."""
    return store.query("SELECT * FROM tensors WHERE run_id = ? ORDER BY seq, tensor", [run_id])


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


def pool_sql(metric: str, v: str) -> str:
    """The SQL aggregate that pools per-tensor column ``v`` of ``metric`` over a group by the metric's catalog
    rule (``opdviz.metrics.registry.AGGREGATIONS``), over a CTE ``per`` with numel, delta_sq (ΣΔW²), base_sq
    (ΣW²), u (entries changed under the run's own mask criterion) and u_exact (bitwise-changed entries).
    Weighted rules weigh only the tensors where the value is defined (NULL/NaN values drop out)."""
    from opdviz.views.formatting import agg_of    # the catalog: formatting knows every stored and derived name
    agg = agg_of(metric)
    weight = {"numel": "per.numel", "changed": "per.u", "changed_exact": "per.u_exact",
              "energy": "per.delta_sq"}.get(agg)
    if weight:
        return f"sum({v} * {weight}) / nullif(sum(CASE WHEN {v} IS NOT NULL THEN {weight} END), 0)"
    if agg == "pooled" and metric == "rel_change":
        return (f"sqrt(sum(CASE WHEN {v} IS NOT NULL THEN per.delta_sq END)) / "
                f"nullif(sqrt(sum(CASE WHEN {v} IS NOT NULL THEN per.base_sq END)), 0)")
    if agg == "pooled":                  # a Frobenius norm: ‖group‖F = sqrt(Σ ‖tensor‖F²)
        return f"sqrt(sum({v} * {v}))"
    if agg in ("sum", "max", "min"):
        return f"{agg}({v})"
    return f"avg({v})"                   # matrix_mean: each matrix counts once


# group_summary's own columns: a pooled metric of the same name is this column (one definition)
SUMMARY_COLUMNS = ("run_id", "method", "layer", "block", "module", "tensor", "n_tensors", "numel", "sparsity",
                   "changed", "delta_sq", "base_sq", "energy_share", "rel_change")


def group_summary(store: Store, sel: Selection = Selection(), by: str = "layer_module",
                  criterion: str = "abs_1e-5", matrix_metrics: tuple[str, ...] = ()) -> pd.DataFrame:
    """Aggregates per run and group ``by`` (run, layer, module, block, layer_module, tensor).

    Columns: run_id, method, <group keys>, n_tensors, numel, sparsity (numel-weighted fraction
    unchanged under ``criterion``), changed, delta_sq, base_sq, energy_share (group ΣΔ² / the
    run's ΣΔ² over the selection), rel_change (sqrt(ΣΔ²)/sqrt(ΣW²)), and for each catalog metric in
    ``matrix_metrics``: ``<name>``, pooled by its catalog rule (``pool_sql``: parameter-, changed- or
    energy-weighted, pooled, or the mean over matrices), plus its unweighted per-matrix mean and median
    (``<name>_mean``, ``<name>_median``). NaN values count as undefined (left out).
    """
    keys = GROUP_KEYS[by]
    where, params = sel.where("t")
    wanted = (f"sparsity_{criterion}", "delta_sq_sum", "base_sq_sum", "sparsity_exact") + tuple(matrix_metrics)
    ph = ", ".join("?" * len(wanted))
    kcols = "".join(f"t.{k}, " for k in keys if k != "tensor")
    extra = "".join(
        f", max(CASE WHEN m.metric = '{_q(n)}' AND NOT isnan(m.value) THEN m.value END) AS \"{_q(n)}_v\""
        for n in matrix_metrics)
    pooled = "".join(f', {pool_sql(n, f"per.{_ident(n)}")} AS "{_q(n)}"'
                     for n in dict.fromkeys(matrix_metrics) if n not in SUMMARY_COLUMNS)
    stats = "".join(f', avg(per."{_q(n)}_v") AS "{_q(n)}_mean", median(per."{_q(n)}_v") AS "{_q(n)}_median"'
                    for n in dict.fromkeys(matrix_metrics))
    gkeys = "".join(f", per.{k}" for k in keys)
    order = "".join(f", per.{k} NULLS FIRST" for k in keys)
    sql = f"""
        WITH mask AS (
            SELECT run_id, 'sparsity_' || coalesce(json_extract_string(options, '$.criterion'), 'abs_1e-5') AS name
            FROM runs),
        per AS (
            SELECT t.run_id, {kcols}t.tensor, t.numel,
                   max(CASE WHEN m.metric = ? THEN m.value END) AS sparsity,
                   max(CASE WHEN m.metric = 'delta_sq_sum' THEN m.value END) AS delta_sq,
                   max(CASE WHEN m.metric = 'base_sq_sum' THEN m.value END) AS base_sq,
                   (1 - max(CASE WHEN m.metric = mask.name THEN m.value END)) * t.numel AS u,
                   (1 - max(CASE WHEN m.metric = 'sparsity_exact' THEN m.value END)) * t.numel AS u_exact
                   {extra}
            FROM tensors t JOIN metrics m USING (run_id, tensor) LEFT JOIN mask USING (run_id)
            WHERE {where} AND (m.metric IN ({ph}) OR m.metric = mask.name)
            GROUP BY t.run_id, {kcols}t.tensor, t.numel
        )
        SELECT per.run_id, r.method{gkeys},
               count(*) AS n_tensors, sum(per.numel) AS numel,
               sum(per.sparsity * per.numel) / sum(per.numel) AS sparsity,
               sum((1 - per.sparsity) * per.numel) AS changed,
               sum(per.delta_sq) AS delta_sq, sum(per.base_sq) AS base_sq,
               sum(per.delta_sq) / sum(sum(per.delta_sq)) OVER (PARTITION BY per.run_id) AS energy_share,
               sqrt(sum(per.delta_sq)) / nullif(sqrt(sum(per.base_sq)), 0) AS rel_change
               {pooled}{stats}
        FROM per LEFT JOIN runs r USING (run_id)
        GROUP BY per.run_id, r.method{gkeys}
        ORDER BY per.run_id{order}"""
    return store.query(sql, [f"sparsity_{criterion}"] + params + list(wanted))


def run_summary(store: Store, sel: Selection = Selection(), criterion: str = "abs_1e-5",
                matrix_metrics: tuple[str, ...] = ("top16_energy", "stable_rank")) -> pd.DataFrame:
    """One row per run over the selection: the main table of 2606.13657 (numel-weighted sparsity,
    pooled relative change, and ``matrix_metrics`` pooled by their catalog rule, as ``group_summary``)."""
    df = group_summary(store, sel, by="run", criterion=criterion, matrix_metrics=tuple(matrix_metrics))
    if df.empty:
        return df
    drop = {"energy_share"} | {f"{n}_{s}" for n in matrix_metrics for s in ("mean", "median")}
    return df.drop(columns=[c for c in df.columns if c in drop])


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
    """All arrays called ``name`` for the selection: tensor fields plus a ``values`` list column."""
    where, params = sel.where("t")
    return store.query(f"""
        SELECT t.run_id, r.method, t.tensor, t.tower, t.layer, t.block, t.module, t.expert,
               a.shape, a."values"
        FROM tensors t JOIN arrays a USING (run_id, tensor) LEFT JOIN runs r USING (run_id)
        WHERE {where} AND a.name = ?
        ORDER BY t.run_id, t.seq, t.tensor""", params + [name])


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


def _ident(name: str) -> str:
    """``name`` as a quoted SQL identifier of its per-tensor value column (``"<name>_v"``)."""
    return f'"{_q(name)}_v"'


def _q(name: str) -> str:
    return name.replace("'", "''").replace('"', '""')


def lab_runs(store: Store) -> pd.DataFrame:
    """Runs written by ``opdviz lab sweep`` (``runs.extra`` has ``"sweep": true``), one row per run and block:
    run_id, method, status, extra (JSON text), block, numel, delta_sq (ΣΔ²), base_sq (ΣW²), per-criterion numel-weighted sparsity
    ``sparsity_<criterion>`` for ``opdviz.options.LAB_CRITERIA``, rel_change (sqrt(ΣΔ²)/sqrt(ΣW²)) and ``principal_proj_10pct``
    (ΔW energy share in the top-10 % principal subspaces of W_base, ‖ΔW‖²-weighted over matrices)."""
    per_crit = "".join(f", max(CASE WHEN m.metric = 'sparsity_{c}' THEN m.value END) AS \"s_{c}\"" for c in LAB_CRITERIA)
    agg_crit = "".join(f", sum(per.\"s_{c}\" * per.numel) / nullif(sum(CASE WHEN per.\"s_{c}\" IS NOT NULL "
                       f"THEN per.numel END), 0) AS \"sparsity_{c}\"" for c in LAB_CRITERIA)
    where, params = Selection().where("t")
    return store.query(f"""
        WITH lab AS (SELECT run_id, method, status, extra FROM runs
                     WHERE json_extract(extra, '$.sweep')::VARCHAR = 'true'),
        per AS (
            SELECT t.run_id, t.block, t.tensor, t.numel,
                   max(CASE WHEN m.metric = 'delta_sq_sum' THEN m.value END) AS dsq,
                   max(CASE WHEN m.metric = 'base_sq_sum' THEN m.value END) AS bsq,
                   max(CASE WHEN m.metric = 'principal_proj_10pct' THEN m.value END) AS proj
                   {per_crit}
            FROM tensors t JOIN metrics m USING (run_id, tensor)
            WHERE {where} AND t.run_id IN (SELECT run_id FROM lab)
            GROUP BY t.run_id, t.block, t.tensor, t.numel)
        SELECT lab.run_id, lab.method, lab.status, lab.extra, per.block, sum(per.numel) AS numel
               {agg_crit}, sum(per.dsq) AS delta_sq, sum(per.bsq) AS base_sq,
               sqrt(sum(per.dsq)) / nullif(sqrt(sum(per.bsq)), 0) AS rel_change,
               sum(per.proj * per.dsq) / nullif(sum(CASE WHEN per.proj IS NOT NULL THEN per.dsq END), 0)
                   AS principal_proj_10pct
        FROM lab JOIN per USING (run_id)
        GROUP BY lab.run_id, lab.method, lab.status, lab.extra, per.block
        ORDER BY lab.run_id, per.block""", params)
