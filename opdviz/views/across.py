"""Views across runs (mask overlap) and along trajectories: statistics and the figure builds of the
Overlap and Trajectory pages (listed in ``opdviz.views.registry``).

The ``overlap`` and ``trajectory`` tables (written by ``opdviz.engine.overlap`` and ``opdviz.engine.trajectory``)
are read through ``opdviz.store.across``; statistics are derived from stored counts, so every group value is numel-weighted
by construction (sums of |A|, |B|, |A∩B|, numel). Builds accept an ``AcrossContext`` (or a plain
``ViewContext``, whose criterion/run_a/run_b are used) and never raise on empty data.

Overlap statistics for masks A, B of one tensor group, densities p_A = |A|/numel, p_B = |B|/numel:
  jaccard  |A∩B| / |A∪B|,  independence baseline p_A·p_B / (p_A + p_B − p_A·p_B)
  cov_a    |A∩B| / |A| (share of A's changes that B made too), baseline p_B
  cov_b    |A∩B| / |B|, baseline p_A
  *_ratio  observed ÷ baseline (1 = no more overlap than two independent random masks)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from opdviz.views import figures_across as FA
from opdviz.store import summary as S
from opdviz.store.across import (overlap_counts, overlap_pairs, trajectories, trajectory_long,
                                 trajectory_metric_names, trajectory_steps)
from opdviz.store import Selection, Store
from opdviz.options import criterion_sort_key
from opdviz.views import formatting
from opdviz.views.context import AcrossContext, across_context

GROUPS = {"all": (), "layer": ("layer",), "module": ("block", "module"), "block": ("block",),
          "layer_module": ("layer", "block", "module"), "tensor": ("tensor", "layer", "block", "module")}
STEP_METRICS = {"sparsity": "entries unchanged vs base (%)", "rel_change": "relative change ‖ΔW‖/‖W‖",
                "energy_share": "share of the step's ‖ΔW‖² (%)", "stable_rank": "stable rank (per-matrix mean)",
                "effective_rank": "effective rank (per-matrix mean)", "top16_energy": "top-16 energy (%)",
                "nss": "NSS (per-matrix mean)"}


# ------------------------------------------------------------------------------------ statistics
def overlap_stats(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` (columns n_a, n_b, n_ab, numel) with p_a, p_b and every statistic above.
    Empty masks give NaN (0/0), never an error."""
    out = df.copy()
    n_a, n_b, n_ab, n = (out[c].astype(float) for c in ("n_a", "n_b", "n_ab", "numel"))
    with np.errstate(divide="ignore", invalid="ignore"):
        pa, pb = n_a / n, n_b / n
        out["p_a"], out["p_b"] = pa, pb
        union = n_a + n_b - n_ab
        out["jaccard"] = (n_ab / union).where(union > 0)
        denom = pa + pb - pa * pb
        out["jaccard_baseline"] = (pa * pb / denom).where(denom > 0)
        out["cov_a"] = (n_ab / n_a).where(n_a > 0)
        out["cov_a_baseline"] = pb
        out["cov_b"] = (n_ab / n_b).where(n_b > 0)
        out["cov_b_baseline"] = pa
        for c in ("jaccard", "cov_a", "cov_b"):
            base = out[f"{c}_baseline"]
            out[f"{c}_ratio"] = (out[c] / base).where(base > 0)
    return out


# ------------------------------------------------------------------------------------ overlap
def _pick_pair(store: Store, sel: Selection, ctx: AcrossContext) -> tuple[str, str] | None:
    if ctx.run_a and ctx.run_b:
        return ctx.run_a, ctx.run_b
    pairs = overlap_pairs(store, sel)
    return None if pairs.empty else (str(pairs["run_a"].iloc[0]), str(pairs["run_b"].iloc[0]))


def overlap_groups(store: Store, run_a: str, run_b: str, criterion: str | None, by: str = "layer_module",
                   sel: Selection = Selection()) -> pd.DataFrame:
    """Summed counts per group ``by`` (all, layer, module, block, layer_module, tensor) and criterion
    (all criteria when ``criterion`` is None), with ``overlap_stats`` columns."""
    df = overlap_counts(store, run_a, run_b, criterion, GROUPS[by], sel)
    df.insert(0, "run_b", run_b)
    df.insert(0, "run_a", run_a)
    return overlap_stats(df)


def top_overlaps(store: Store, sel: Selection, ctx, n: int = 25) -> pd.DataFrame:
    """The tensors whose masks overlap most beyond chance (highest Jaccard ÷ baseline) for the pair and
    criterion of ``ctx``; numbers as fractions."""
    ctx = across_context(ctx)
    pair = _pick_pair(store, sel, ctx)
    if pair is None:
        return pd.DataFrame()
    df = overlap_groups(store, *pair, ctx.criterion, "tensor", sel)
    cols = ["tensor", "layer", "module", "jaccard_ratio", "jaccard", "jaccard_baseline", "p_a", "p_b", "cov_a",
            "cov_b", "numel"]
    return df.sort_values(["jaccard_ratio", "n_ab"], ascending=False, na_position="last")[cols].head(n)


# ------------------------------------------------------------------------------------ trajectory
def _pick_trajectory(store: Store, ctx: AcrossContext) -> str | None:
    if ctx.trajectory:
        return ctx.trajectory
    t = trajectories(store)
    return None if t.empty else str(t["trajectory"].iloc[0])


def trajectory_by_module(store: Store, name: str, sel: Selection, metric: str, weight: str | None = None) -> pd.DataFrame:
    """``metric`` per (step, module): numel-weighted (optionally × the metric ``weight``, e.g. the density
    for shares of changed coordinates) or, for per-matrix metrics (weight "matrix"), the mean."""
    wanted = (metric,) + ((weight,) if weight and weight != "matrix" else ())
    df = trajectory_long(store, name, sel, wanted)
    if df.empty:
        return pd.DataFrame(columns=["step", "module", metric])
    wide = df.pivot_table(index=["step", "tensor", "module", "numel"], columns="metric", values="value",
                          aggfunc="first").reset_index()
    if metric not in wide:
        return pd.DataFrame(columns=["step", "module", metric])
    if weight == "matrix":
        out = wide.groupby(["step", "module"])[metric].mean().reset_index()
    else:
        w = wide["numel"].astype(float) * (wide[weight] if weight else 1.0)
        wide = wide.assign(_w=w.where(wide[metric].notna(), 0.0), _v=(wide[metric] * w).fillna(0.0))
        g = wide.groupby(["step", "module"])[["_v", "_w"]].sum().reset_index()
        g[metric] = (g["_v"] / g["_w"]).where(g["_w"] > 0)
        out = g[["step", "module", metric]]
    return out


def step_summary(store: Store, name: str, sel: Selection, criterion: str, metric: str) -> pd.DataFrame:
    """A per-pair metric of every step run, per module: step, module, ``metric`` (group_summary columns, or a
    catalog metric pooled over the module by its catalog rule, as the Compare page)."""
    runs = trajectory_steps(store, name)
    if runs.empty:
        return pd.DataFrame(columns=["step", "module", metric])
    s = Selection(runs=tuple(runs["run_id"]), towers=sel.towers, blocks=sel.blocks, modules=sel.modules,
                  layer_min=sel.layer_min, layer_max=sel.layer_max)
    group_cols = ("sparsity", "energy_share", "rel_change")
    mm = () if metric in group_cols else (metric,)
    df = S.group_summary(store, s, by="module", criterion=criterion, matrix_metrics=mm)
    if df.empty:
        return pd.DataFrame(columns=["step", "module", metric])
    col = metric
    if mm and metric in S.SUMMARY_COLUMNS:
        return pd.DataFrame(columns=["step", "module", metric])
    df = df.merge(runs, on="run_id")
    return df.assign(**{metric: df[col]})[["step", "module", metric]]


# ------------------------------------------------------------------------------------ builds
def _pair_title(pair) -> str:
    return f"A = {pair[0]}, B = {pair[1]}"


def _no_pair(title: str):
    return FA.F.empty_figure("no overlap computed: run `opdviz overlap --db DB --base BASE --a POST_A --b POST_B "
                             "--run-a A --run-b B`", title), pd.DataFrame()


def cov_heatmap(store, sel, ctx):
    ctx = across_context(ctx)
    title = "Coverage: share of one run's changes the other made too"
    pair = _pick_pair(store, sel, ctx)
    if pair is None:
        return _no_pair(title)
    df = overlap_groups(store, *pair, ctx.criterion, "layer_module", sel)
    panels = [("cov_a", "|A∩B|/|A|"), ("cov_a_baseline", "baseline p_B"), ("cov_b", "|A∩B|/|B|"),
              ("cov_b_baseline", "baseline p_A")]
    return FA.overlap_heatmaps(df, panels, "coverage (%)", f"{title} ({_pair_title(pair)}, {ctx.criterion})"), df


def jaccard_heatmap(store, sel, ctx):
    ctx = across_context(ctx)
    title = "Jaccard overlap of the changed masks"
    pair = _pick_pair(store, sel, ctx)
    if pair is None:
        return _no_pair(title)
    df = overlap_groups(store, *pair, ctx.criterion, "layer_module", sel)
    panels = [("jaccard", "Jaccard |A∩B|/|A∪B|"), ("jaccard_baseline", "independence baseline")]
    return FA.overlap_heatmaps(df, panels, "Jaccard (%)", f"{title} ({_pair_title(pair)}, {ctx.criterion})"), df


def ratio_heatmap(store, sel, ctx):
    ctx = across_context(ctx)
    title = "Overlap beyond chance: observed ÷ independence baseline"
    pair = _pick_pair(store, sel, ctx)
    if pair is None:
        return _no_pair(title)
    df = overlap_groups(store, *pair, ctx.criterion, "layer_module", sel)
    panels = [("jaccard_ratio", "Jaccard"), ("cov_a_ratio", "|A∩B|/|A| ÷ p_B"), ("cov_b_ratio", "|A∩B|/|B| ÷ p_A")]
    return (FA.overlap_heatmaps(df, panels, "log₂(observed ÷ baseline)",
                                f"{title} ({_pair_title(pair)}, {ctx.criterion})", ratio=True), df)


def by_criterion(store, sel, ctx):
    ctx = across_context(ctx)
    title = "Overlap under each criterion (whole selection)"
    pair = _pick_pair(store, sel, ctx)
    if pair is None:
        return _no_pair(title)
    df = overlap_groups(store, *pair, None, "all", sel)
    order = sorted(df["criterion"], key=criterion_sort_key)
    df = df.set_index("criterion").loc[order].reset_index()
    return FA.overlap_by_criterion(df, f"{title}, {_pair_title(pair)}"), df


def _traj_title(title: str, name: str | None) -> str:
    return f"{title} — {name}" if name else title


def _no_traj(title: str):
    return FA.F.empty_figure("no trajectory computed: run `opdviz trajectory --db DB BASE CHECKPOINTS… --name NAME "
                             "--method LABEL`", title), pd.DataFrame()


def step_metric(store, sel, ctx):
    ctx = across_context(ctx)
    name = _pick_trajectory(store, ctx)
    head = STEP_METRICS.get(ctx.metric, ctx.metric).split(" (")[0]
    title = _traj_title(f"{head[0].upper()}{head[1:]} by step", name)
    if name is None:
        return _no_traj(title)
    df = step_summary(store, name, sel, ctx.criterion, ctx.metric)
    # the axis from the catalog: label, unit and how a module pools the metric (as on the Compare page)
    pct = formatting.unit_of(formatting.catalog_name(ctx.metric, ctx.criterion)) == "fraction"
    return FA.step_lines(df, ctx.metric, formatting.metric_label(ctx.metric, ctx.criterion), title, percent=pct), df


def sim_k(store, sel, ctx):
    ctx = across_context(ctx)
    name = _pick_trajectory(store, ctx)
    title = _traj_title("Subspace locking Sim_K(t) = ‖V_K(t)ᵀV_K(T)‖²/K", name)
    if name is None:
        return _no_traj(title)
    names = trajectory_metric_names(store, name, "sim_k")
    if not names:
        return FA.F.empty_figure(title=title), pd.DataFrame()
    metric = str(names[0])
    df = trajectory_by_module(store, name, sel, metric, weight="matrix")
    return FA.step_lines(df, metric, f"Sim_K, K = {metric[5:]} (per-matrix mean)", title), df


def consecutive(store, sel, ctx):
    ctx = across_context(ctx)
    name = _pick_trajectory(store, ctx)
    title = _traj_title("Entries unchanged between consecutive checkpoints", name)
    if name is None:
        return _no_traj(title)
    metric = f"sparsity_consec_{ctx.criterion}"
    df = trajectory_by_module(store, name, sel, metric)
    if df.empty or df[metric].notna().sum() == 0:   # the default criterion of the job differs from the sidebar
        metric = "sparsity_consec_exact"
        df = trajectory_by_module(store, name, sel, metric)
    return FA.step_lines(df, metric, f"unchanged t−1 → t, {metric[16:]} (%)", title, percent=True), df


def outside_final(store, sel, ctx):
    ctx = across_context(ctx)
    name = _pick_trajectory(store, ctx)
    title = _traj_title("Updates outside the final mask", name)
    if name is None:
        return _no_traj(title)
    crit = ctx.criterion
    metric = f"outside_final_{crit}"
    df = trajectory_by_module(store, name, sel, metric, weight=f"density_{crit}")
    if df.empty or df[metric].notna().sum() == 0:
        crit, metric = "exact", "outside_final_exact"
        df = trajectory_by_module(store, name, sel, metric, weight="density_exact")
    return FA.step_lines(df, metric, f"not in the final mask, {crit} (%)",
                         title, percent=True), df


def hill(store, sel, ctx):
    ctx = across_context(ctx)
    name = _pick_trajectory(store, ctx)
    title = _traj_title("Heavy-tail exponent of the ESD of Δ_t (Hill)", name)
    if name is None:
        return _no_traj(title)
    names = trajectory_metric_names(store, name, "hill_alpha")
    if not names:
        return FA.F.empty_figure(title=title), pd.DataFrame()
    metric = str(names[0])
    df = trajectory_by_module(store, name, sel, metric, weight="matrix")
    return FA.step_lines(df, metric, "Hill α̂ (per-matrix mean)", title), df
