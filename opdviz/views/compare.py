"""Builds of the Compare page: any metric per module, by layer, and run B − run A, each pooled over a group
by the metric's catalog rule (``opdviz.store.summary.pool_sql``)."""

from __future__ import annotations

import pandas as pd

from opdviz.store import Selection, Store
from opdviz.store import summary as S
from opdviz.views import figures as F
from opdviz.views import style
from opdviz.views import formatting
from opdviz.views.context import ViewContext

# group_summary columns a Compare page may show ("sparsity" under the sidebar criterion); any other name is a
# stored catalog metric, pooled by its catalog rule
GROUP_COLUMNS = ("sparsity", "energy_share", "rel_change", "changed", "numel")


def _scale(metric: str) -> float:
    """Stored → shown: ×100 for fractions, degrees for radians (the catalog's unit), else 1."""
    return formatting.SCALE.get(formatting.unit_of(formatting.catalog_name(metric)), 1.0)


def metric_frame(store: Store, sel: Selection, ctx: ViewContext, by: str) -> pd.DataFrame:
    """``ctx.metric`` per run and group ``by`` in a column ``value`` (display units: % where a share), pooled
    over the group by the metric's catalog rule (``summary.pool_sql``): sparsity parameter-weighted, coverage
    by the changed entries, relative change from pooled sums, spectral scalars as the mean over matrices."""
    mm = () if ctx.metric in GROUP_COLUMNS else (ctx.metric,)
    df = S.group_summary(store, sel, by=by, criterion=ctx.criterion, matrix_metrics=mm)
    col = ctx.metric
    if mm and ctx.metric in S.SUMMARY_COLUMNS:       # a key or bookkeeping column (layer, delta_sq…): no metric
        df = df.iloc[:0]
    if df.empty or col not in df:
        return pd.DataFrame(columns=list(df.columns) + ["value"])
    return df.assign(value=_scale(ctx.metric) * df[col].astype(float))


def _compare_name(ctx) -> str:
    """The metric in a Compare title; sparsity says which entries count as changed."""
    return f"sparsity ({formatting.criterion_label(ctx.criterion)})" if ctx.metric == "sparsity" else ctx.metric


def compare_bars(store, sel, ctx):
    df = metric_frame(store, sel, ctx, "module")
    if not df.empty:
        df = df.assign(module=df["module"].astype(str))
        order = sorted(df["module"].unique(), key=style.module_sort_key)
        df = df.set_index("module").loc[order].reset_index()
    return F.bars(df, "module", "value", f"{_compare_name(ctx)} per module", "module",
                  formatting.metric_label(ctx.metric, ctx.criterion)), df


def compare_layerwise(store, sel, ctx):
    df = metric_frame(store, sel, ctx, "layer")
    return F.layerwise_lines(df, "value", formatting.metric_label(ctx.metric, ctx.criterion), f"{_compare_name(ctx)} by layer",
                             color="run_id", facet=None), df


def compare_difference(store, sel, ctx):
    df = metric_frame(store, sel, ctx, "layer_module")
    runs = list(dict.fromkeys(df["run_id"])) if len(df) else []
    a = ctx.run_a or (runs[0] if runs else None)
    b = ctx.run_b or next((r for r in runs if r != a), None)
    title = f"Difference in {_compare_name(ctx)}: {b} − {a}"
    if a is None or b is None or a == b or a not in runs or b not in runs:
        return F.empty_figure("pick two different runs with data (run A and run B)", title=title), pd.DataFrame()
    keys = ["layer", "block", "module"]
    m = df[df["run_id"] == a][keys + ["value"]].merge(df[df["run_id"] == b][keys + ["value"]], on=keys,
                                                        suffixes=("_a", "_b"))
    m["difference"] = m["value_b"] - m["value_a"]
    m.insert(0, "run_b", b)
    m.insert(0, "run_a", a)
    return F.difference_heatmap(m, "difference", f"Δ {formatting.metric_label(ctx.metric, ctx.criterion)}", title,
                                text=m["layer"].nunique() <= 8), m
