"""Views across runs (mask overlap) and along trajectories: read-side queries and figure specs.

The ``overlap`` and ``trajectory`` tables (written by ``opdviz.engine.overlap`` and ``opdviz.engine.trajectory``)
are read through ``opdviz.store.across``; statistics are derived from stored counts, so every group value is numel-weighted
by construction (sums of |A|, |B|, |A∩B|, numel). ``FIGURES`` uses the ``FigureSpec`` type of
``opdviz.views.single`` with pages "overlap" and "trajectory"; builds accept an ``AcrossContext`` (or a
plain ``ViewContext``, whose criterion/run_a/run_b are used) and never raise on empty data.

Overlap statistics for masks A, B of one tensor group, densities p_A = |A|/numel, p_B = |B|/numel:
  jaccard  |A∩B| / |A∪B|,  independence baseline p_A·p_B / (p_A + p_B − p_A·p_B)
  cov_a    |A∩B| / |A| (share of A's changes that B made too), baseline p_B
  cov_b    |A∩B| / |B|, baseline p_A
  *_ratio  observed ÷ baseline (1 = no more overlap than two independent random masks)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from opdviz.views import figures_across as FA
from opdviz.store import summary as S
from opdviz.store.across import (overlap_counts, overlap_pairs, trajectories, trajectory_long,
                                 trajectory_metric_names, trajectory_steps)
from opdviz.store.selection import Selection
from opdviz.store import Store
from opdviz.views import formatting
from opdviz.views.single import FigureSpec, catalog_name, metric_label

PAGES = ("overlap", "trajectory")
GROUPS = {"all": (), "layer": ("layer",), "module": ("block", "module"), "block": ("block",),
          "layer_module": ("layer", "block", "module"), "tensor": ("tensor", "layer", "block", "module")}
STEP_METRICS = {"sparsity": "entries unchanged vs base (%)", "rel_change": "relative change ‖ΔW‖/‖W‖",
                "energy_share": "share of the step's ‖ΔW‖² (%)", "stable_rank": "stable rank (per-matrix mean)",
                "effective_rank": "effective rank (per-matrix mean)", "top16_energy": "top-16 energy (%)",
                "nss": "NSS (per-matrix mean)"}


@dataclass(frozen=True)
class AcrossContext:
    """Page choices for the overlap and trajectory pages (None → the first stored pair / trajectory)."""

    criterion: str = "abs_1e-5"
    run_a: str | None = None
    run_b: str | None = None
    trajectory: str | None = None
    metric: str = "sparsity"            # trajectory page: per-step metric


def _ctx(ctx) -> AcrossContext:
    if isinstance(ctx, AcrossContext):
        return ctx
    return AcrossContext(criterion=getattr(ctx, "criterion", "abs_1e-5"), run_a=getattr(ctx, "run_a", None),
                         run_b=getattr(ctx, "run_b", None))


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
    ctx = _ctx(ctx)
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


def _cov_heatmap(store, sel, ctx):
    ctx = _ctx(ctx)
    title = "Coverage: share of one run's changes the other made too"
    pair = _pick_pair(store, sel, ctx)
    if pair is None:
        return _no_pair(title)
    df = overlap_groups(store, *pair, ctx.criterion, "layer_module", sel)
    panels = [("cov_a", "|A∩B|/|A|"), ("cov_a_baseline", "baseline p_B"), ("cov_b", "|A∩B|/|B|"),
              ("cov_b_baseline", "baseline p_A")]
    return FA.overlap_heatmaps(df, panels, "coverage (%)", f"{title} ({_pair_title(pair)}, {ctx.criterion})"), df


def _jaccard_heatmap(store, sel, ctx):
    ctx = _ctx(ctx)
    title = "Jaccard overlap of the changed masks"
    pair = _pick_pair(store, sel, ctx)
    if pair is None:
        return _no_pair(title)
    df = overlap_groups(store, *pair, ctx.criterion, "layer_module", sel)
    panels = [("jaccard", "Jaccard |A∩B|/|A∪B|"), ("jaccard_baseline", "independence baseline")]
    return FA.overlap_heatmaps(df, panels, "Jaccard (%)", f"{title} ({_pair_title(pair)}, {ctx.criterion})"), df


def _ratio_heatmap(store, sel, ctx):
    ctx = _ctx(ctx)
    title = "Overlap beyond chance: observed ÷ independence baseline"
    pair = _pick_pair(store, sel, ctx)
    if pair is None:
        return _no_pair(title)
    df = overlap_groups(store, *pair, ctx.criterion, "layer_module", sel)
    panels = [("jaccard_ratio", "Jaccard"), ("cov_a_ratio", "|A∩B|/|A| ÷ p_B"), ("cov_b_ratio", "|A∩B|/|B| ÷ p_A")]
    return (FA.overlap_heatmaps(df, panels, "log₂(observed ÷ baseline)",
                                f"{title} ({_pair_title(pair)}, {ctx.criterion})", ratio=True), df)


def _by_criterion(store, sel, ctx):
    ctx = _ctx(ctx)
    title = "Overlap under each criterion (whole selection)"
    pair = _pick_pair(store, sel, ctx)
    if pair is None:
        return _no_pair(title)
    df = overlap_groups(store, *pair, None, "all", sel)
    kinds = {"exact": 0, "abs": 1, "relrms": 2, "bf16": 3}
    order = sorted(df["criterion"], key=lambda c: (kinds.get(c.partition("_")[0], 4), float(c.partition("_")[2] or 0)))
    df = df.set_index("criterion").loc[order].reset_index()
    return FA.overlap_by_criterion(df, f"{title}, {_pair_title(pair)}"), df


def _traj_title(title: str, name: str | None) -> str:
    return f"{title} — {name}" if name else title


def _no_traj(title: str):
    return FA.F.empty_figure("no trajectory computed: run `opdviz trajectory --db DB BASE CHECKPOINTS… --name NAME "
                             "--method LABEL`", title), pd.DataFrame()


def _step_metric(store, sel, ctx):
    ctx = _ctx(ctx)
    name = _pick_trajectory(store, ctx)
    head = STEP_METRICS.get(ctx.metric, ctx.metric).split(" (")[0]
    title = _traj_title(f"{head[0].upper()}{head[1:]} by step", name)
    if name is None:
        return _no_traj(title)
    df = step_summary(store, name, sel, ctx.criterion, ctx.metric)
    # the axis from the catalog: label, unit and how a module pools the metric (as on the Compare page)
    pct = formatting.unit_of(catalog_name(ctx.metric, ctx.criterion)) == "fraction"
    return FA.step_lines(df, ctx.metric, metric_label(ctx.metric, ctx.criterion), title, percent=pct), df


def _sim_k(store, sel, ctx):
    ctx = _ctx(ctx)
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


def _consecutive(store, sel, ctx):
    ctx = _ctx(ctx)
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


def _outside_final(store, sel, ctx):
    ctx = _ctx(ctx)
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


def _hill(store, sel, ctx):
    ctx = _ctx(ctx)
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


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("overlap.coverage", "overlap", "Coverage of one run's mask by the other",
               "|A∩B|/|A|: of the entries run A changed, the share run B changed too; its independence baseline is "
               "B's density p_B (and symmetrically). Counts are summed per layer and module (numel-weighted).",
               _cov_heatmap),
    FigureSpec("overlap.jaccard", "overlap", "Jaccard overlap",
               "|A∩B|/|A∪B| of the two changed masks, next to the value two independent random masks of the same "
               "densities would give, p_A·p_B/(p_A+p_B−p_A·p_B).", _jaccard_heatmap),
    FigureSpec("overlap.ratio", "overlap", "Observed ÷ baseline",
               "log₂ of how many times more overlap than chance: 0 = independent masks, +1 = twice chance, −1 = half "
               "(diverging colours centred on 0).",
               _ratio_heatmap),
    FigureSpec("overlap.criteria", "overlap", "Overlap under each criterion",
               "Whole-selection Jaccard and coverages for every stored criterion (log scale), thin grey bars = "
               "independence baselines.", _by_criterion),
    FigureSpec("trajectory.step_metric", "trajectory", "Per-pair metric by step",
               "A metric of the per-step runs (each checkpoint vs the base) per module against the training step.",
               _step_metric),
    FigureSpec("trajectory.sim_k", "trajectory", "Subspace locking",
               "Sim_K(t) = (1/K)‖V_K(t)ᵀV_K(T)‖F², V_K the top-K right singular vectors of Δ_t = W_t − W_base; "
               "1 = the update already points where it ends (arXiv 2606.07082). Mean over matrices.", _sim_k),
    FigureSpec("trajectory.consecutive", "trajectory", "Consecutive-step sparsity",
               "Share of entries unchanged between checkpoint t−1 and t (the base before the first), numel-weighted.",
               _consecutive),
    FigureSpec("trajectory.outside_final", "trajectory", "Updates outside the final mask",
               "Of the entries changed at step t (vs the base), the share the final checkpoint leaves unchanged: "
               "transient updates. Weighted by the changed counts.", _outside_final),
    FigureSpec("trajectory.hill", "trajectory", "Heavy-tail exponent",
               "Hill estimate α̂ = 1 + k/Σ ln(λ_i/λ_{k+1}) over the top 10 % eigenvalues λ = σ² of Δ_tᵀΔ_t "
               "(density exponent; smaller = heavier tail).", _hill),
)


def figures_for(page: str) -> tuple[FigureSpec, ...]:
    return tuple(f for f in FIGURES if f.page == page)


def figure_spec(key: str) -> FigureSpec:
    for f in FIGURES:
        if f.key == key:
            return f
    raise KeyError(f"no figure {key!r}; known: {', '.join(f.key for f in FIGURES)}")
