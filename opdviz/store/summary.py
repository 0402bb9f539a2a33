"""Group aggregates over the store: every catalog metric pooled over runs, layers, modules or blocks.

Aggregation rules: every catalog metric is pooled over a group by its own rule (``pool_sql``, from the
catalog's ``agg``: parameter-, changed- or energy-weighted, pooled sums, or the mean over matrices); fused
tensors are counted once — through their parts when they were split (``parent`` rows with parts are not
"leaves"), else whole.
"""

from __future__ import annotations

import pandas as pd

from opdviz.store.core import Store
from opdviz.store.selection import Selection

GROUP_KEYS = {
    "run": (),
    "layer": ("layer",),
    "module": ("block", "module"),
    "block": ("block",),
    "layer_module": ("layer", "block", "module"),
    "tensor": ("tensor", "layer", "block", "module"),
}


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


def _ident(name: str) -> str:
    """``name`` as a quoted SQL identifier of its per-tensor value column (``"<name>_v"``)."""
    return f'"{_q(name)}_v"'


def _q(name: str) -> str:
    return name.replace("'", "''").replace('"', '""')
