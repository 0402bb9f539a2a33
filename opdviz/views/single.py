"""The figure registry shared by the dashboard pages and ``opdviz figures``.

Each ``FigureSpec`` names a figure (``key``), the page it belongs to, its caption, and a ``build``
function ``(store, selection, context) → (figure, data behind it)``. Builds read the store through
``opdviz.store.queries`` and ``opdviz.store.summary`` and draw with ``opdviz.views.figures``; on an
empty selection they return a figure annotated "no data for this selection", never raise.

    from opdviz.views.single import FIGURES, figures_for, ViewContext
    fig, df = figures_for("sparsity")[0].build(store, Selection(), ViewContext())
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from opdviz.views import figures as F
from opdviz.views import formatting
from opdviz.store import queries as Q
from opdviz.store import summary as S
from opdviz.metrics.rankgrid import PROJ_GRID, rank_grid
from opdviz.options import DEFAULT_CRITERIA
from opdviz.store.selection import Selection
from opdviz.store import Store

PAGES = ("overview", "sparsity", "spectra", "geometry", "tensor", "compare")
CRITERIA = DEFAULT_CRITERIA
ALPHAS = (1, 5, 10, 20, 30, 50)
TOPK = (1, 2, 4, 8, 16, 32, 64)
# group_summary columns a Compare page may show ("sparsity" under the sidebar criterion); any other name is a
# stored catalog metric, pooled by its catalog rule
GROUP_COLUMNS = ("sparsity", "energy_share", "rel_change", "changed", "numel")


@dataclass(frozen=True)
class ViewContext:
    """Page-level choices besides the shared ``Selection``."""

    criterion: str = "abs_1e-5"
    tensor: str | None = None                 # Tensor page drill-down (None → largest layer matrix)
    tensors: tuple[str, ...] = ()             # Spectra/Geometry chosen tensors (empty → middle-layer q and down)
    metric: str = "sparsity"                  # Compare page metric (a group_summary column or a catalog metric)
    run_a: str | None = None                  # Compare difference heatmap: run_b − run_a
    run_b: str | None = None


@dataclass(frozen=True)
class FigureSpec:
    key: str
    page: str
    title: str
    caption: str
    build: Callable[[Store, Selection, ViewContext], tuple[go.Figure, pd.DataFrame]]


# ------------------------------------------------------------------------------------ small helpers
def _criterion_label(c: str) -> str:
    kind, _, val = c.partition("_")
    return {"exact": "bitwise", "abs": f"|ΔW| > {val}", "relrms": f"|ΔW| > {val}·RMS(W)",
            "bf16": f"|ΔW| > {val}·max|W|"}.get(kind, c)


def catalog_name(metric: str, criterion: str = "abs_1e-5") -> str:
    """The catalog name of a Compare-page metric: ``sparsity`` is ``sparsity_<criterion>``."""
    return f"sparsity_{criterion}" if metric == "sparsity" else metric


def metric_label(metric: str, criterion: str = "abs_1e-5") -> str:
    """Axis title of a Compare-page metric, all from the catalog: label, unit and how a group pools it
    on a second line (``sparsity (%)<br>parameter-weighted``: ``formatting.axis_title``). The figure's title
    names the metric itself (``top16_energy per module``)."""
    return formatting.axis_title(catalog_name(metric, criterion), sep="<br>")


def _unit(metric: str) -> str:
    return formatting.unit_of(catalog_name(metric))


def _is_fraction(metric: str) -> bool:
    """Metrics stored as fractions in [0, 1], shown as percentages (the catalog's unit)."""
    return _unit(metric) == "fraction"


def _scale(metric: str) -> float:
    """Stored → shown: ×100 for fractions, degrees for radians (the catalog's unit), else 1."""
    return formatting.SCALE.get(_unit(metric), 1.0)


def _short(row) -> str:
    """'L12 q' for a layer tensor, else its module (embed, lm_head)."""
    layer = row.get("layer")
    return f"L{int(layer)} {row.get('module')}" if layer is not None and not pd.isna(layer) else str(row.get("module"))


def _arrays(store: Store, sel: Selection, name: str, tensors: tuple[str, ...] = ()) -> pd.DataFrame:
    """Arrays ``name`` of the selected tensors (of only ``tensors`` when given), with tensor fields.

    With ``tensors``, the rows come from ``tensor_arrays`` (every array of those tensors in one query,
    which the other figures of the page share through the store's memo)."""
    if tensors:
        a = Q.tensor_arrays(store, sel, tuple(tensors))
        return a[a["name"] == name].reset_index(drop=True)
    return Q.arrays_long(store, sel, name)


def _default_tensors(store: Store, sel: Selection, ctx: ViewContext, per_run: int = 2) -> tuple[str, ...]:
    """ctx.tensors, else a middle-layer attention q and FFN down (the same names in every run)."""
    if ctx.tensors:
        return tuple(ctx.tensors)
    t = Q.tensors(store, sel)
    t = t[t["rows"].notna() & t["cols"].notna() & t["layer"].notna()]
    if t.empty:
        return ()
    mid = sorted(t["layer"].unique())[len(t["layer"].unique()) // 2]
    at = t[t["layer"] == mid]
    picks = [at[at["module"] == m]["tensor"].iloc[0] for m in ("q", "down") if (at["module"] == m).any()]
    return tuple(picks or at["tensor"].head(per_run))


def _pick_tensor(store: Store, sel: Selection, ctx: ViewContext) -> str | None:
    if ctx.tensor:
        return ctx.tensor
    t = Q.tensors(store, sel)
    t = t[t["rows"].notna() & t["cols"].notna()]
    if t.empty:
        return None
    # the largest matrix inside a layer (the embedding/head are rarely what a drill-down is for)
    t = t.assign(no_layer=t["layer"].isna())
    return str(t.sort_values(["no_layer", "numel", "seq"], ascending=[True, False, True])["tensor"].iloc[0])


def _with_label(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["label"] = [_short(r) for r in df[["layer", "module"]].to_dict("records")] if len(df) else []
    return df


# ------------------------------------------------------------------------------------ builds: overview & sparsity
def _sparsity_heatmap(store, sel, ctx):
    df = S.group_summary(store, sel, by="layer_module", criterion=ctx.criterion)
    df["sparsity_pct"] = 100 * df["sparsity"] if len(df) else []
    fig = F.heatmap(df, "sparsity_pct", formatting.label_of(f"sparsity_{ctx.criterion}"),
                    f"Sparsity of ΔW by layer and module ({_criterion_label(ctx.criterion)} counts as changed)")
    return fig, df


def _energy_share(store, sel, ctx):
    df = S.group_summary(store, sel, by="module", criterion=ctx.criterion)
    return F.energy_shares(df, "Where the update energy goes: share of ‖ΔW‖²<sub>F</sub> per module"), df


def _criteria(store, sel, ctx):
    df = Q.long_metrics(store, sel, tuple(f"sparsity_{c}" for c in CRITERIA))
    if df.empty:
        return F.empty_figure(title="Sparsity under each criterion"), df
    df["w"] = df["value"] * df["numel"]
    agg = df.groupby(["run_id", "method", "metric"], dropna=False).agg(w=("w", "sum"), numel=("numel", "sum"))
    agg = agg.reset_index()
    agg["sparsity"] = agg["w"] / agg["numel"]
    agg["criterion"] = agg["metric"].str.removeprefix("sparsity_")
    order = {c: i for i, c in enumerate(CRITERIA)}
    agg = agg.sort_values(["run_id", "criterion"], key=lambda s: s.map(order) if s.name == "criterion" else s)
    agg["criterion_label"] = agg["criterion"].map(_criterion_label)
    agg = agg[["run_id", "method", "criterion", "criterion_label", "sparsity", "numel"]]
    fig = F.bars(agg, "criterion_label", "sparsity", "Sparsity of ΔW under each criterion (numel-weighted)",
                 "entry counts as changed when", formatting.axis_title("sparsity_exact"), percent=True)
    fig.update_xaxes(tickangle=-30)
    return fig, agg


def _layerwise(store, sel, ctx):
    df = S.group_summary(store, sel, by="layer_module", criterion=ctx.criterion)
    df["sparsity_pct"] = 100 * df["sparsity"] if len(df) else []
    fig = F.layerwise_lines(df, "sparsity_pct", formatting.label_of(f"sparsity_{ctx.criterion}"),
                            f"Layerwise sparsity per projection ({_criterion_label(ctx.criterion)})")
    return fig, df


def _numel_weighted_arrays(store, sel, name: str, tensors: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per run: the numel-weighted mean of a fixed-length array over the selected tensors (long form)."""
    a = _arrays(store, sel, name, tensors)
    if a.empty:
        return pd.DataFrame(columns=["run_id", "method", "i", "value"])
    rows = []
    for (run_id, method), g in a.groupby(["run_id", "method"], dropna=False, sort=False):
        lengths = g["values"].map(len)
        g = g[lengths == lengths.mode().iloc[0]]
        vals = np.vstack(g["values"].map(np.asarray).to_list())
        w = g["numel"].to_numpy(dtype=float)
        mean = (vals * w[:, None]).sum(0) / w.sum()
        rows += [{"run_id": run_id, "method": method, "i": i, "value": v} for i, v in enumerate(mean)]
    return pd.DataFrame(rows)


def _sweep(store, sel, ctx):
    df = _numel_weighted_arrays(store, sel, "abs_sweep_sparsity")
    eps = _arrays(store, sel, "abs_sweep_eps")
    if df.empty or eps.empty:
        return F.empty_figure(title="Sparsity against the threshold ε"), df
    grid = np.asarray(eps["values"].iloc[0])
    df = df[df["i"] < len(grid)].assign(eps=lambda d: grid[d["i"].to_numpy()]).rename(columns={"value": "sparsity"})
    mark = float(ctx.criterion.split("_")[1]) if ctx.criterion.startswith("abs_") else None
    return F.sweep(df, "Sparsity against the threshold ε on |ΔW| (numel-weighted)", mark_eps=mark), df


def _deciles(store, sel, ctx):
    df = _numel_weighted_arrays(store, sel, "decile_density").rename(columns={"value": "density"})
    if df.empty:
        return F.empty_figure(title="Update density by magnitude decile of W_base"), df
    df["decile"] = df["i"] + 1
    df["relative"] = df["density"] / df.groupby("run_id")["density"].transform("mean")
    df["density_label"] = [f"{100 * v:.2f}% of entries changed" for v in df["density"]]
    return F.decile_profile(df, "Update density by decile of |W<sub>base</sub>|"), df


def _rel_change_heatmap(store, sel, ctx):
    df = S.group_summary(store, sel, by="layer_module", criterion=ctx.criterion)
    df["rel_change_1e3"] = 1e3 * df["rel_change"] if len(df) else []
    return F.heatmap(df, "rel_change_1e3", formatting.label_of("rel_change", with_unit=False) + " (×10⁻³)",
                     "Relative change by layer and module"), df


def _mask_criteria(store: Store, run_ids) -> dict[str, str]:
    """run_id → the criterion its default changed mask U used (``options.criterion`` at compute time):
    the coverage metrics are shares of that U, whatever criterion the sidebar shows."""
    out = {}
    for run_id in run_ids:
        row = store.run_row(run_id) or {}
        out[run_id] = str(_json(row.get("options")).get("criterion") or ViewContext().criterion)
    return out


def _coverage_df(store, sel, ctx, kinds=(("lowmag_coverage", "low-magnitude mask"),
                                         ("principal_coverage", "principal mask"))) -> pd.DataFrame:
    """Model-level coverage per run, kind and α: the share of the run's changed entries U (pooled over the
    selected matrices) that fall in the masks, Σ|M∩U| / Σ|U| = Σ coverage·|U| / Σ|U| — the same number
    for the Overview table, this figure, its CSV and a recomputation from ``opdviz metrics``. U is the
    run's default mask (``options.criterion``), or the bitwise mask for the ``_exact`` variants."""
    names = tuple(f"{p}_{a}pct" for p, _ in kinds for a in ALPHAS)
    base = Q.long_metrics(store, sel, names)
    cols = ["run_id", "method", "kind", "alpha", "coverage", "baseline", "enrichment", "changed_entries", "n_matrices"]
    if base.empty:
        return pd.DataFrame(columns=cols)
    crits = _mask_criteria(store, base["run_id"].unique())
    spars = tuple(sorted({f"sparsity_{c}" for c in crits.values()} | {"sparsity_exact"}))
    df = pd.concat([base, Q.long_metrics(store, sel, spars)], ignore_index=True)
    wide = df.pivot_table(index=["run_id", "tensor"], columns="metric", values="value", aggfunc="first")
    wide.columns.name = None
    wide = df[["run_id", "method", "tensor", "numel"]].drop_duplicates(["run_id", "tensor"]).merge(
        wide.reset_index(), on=["run_id", "tensor"], how="left")
    rows = []
    for prefix, label in kinds:
        exact = prefix.endswith("_exact")
        for a in ALPHAS:
            col = f"{prefix}_{a}pct"
            if col not in wide:
                continue
            for (run_id, method), g in wide[wide[col].notna()].groupby(["run_id", "method"], dropna=False):
                sp = g.get("sparsity_exact" if exact else f"sparsity_{crits[run_id]}")
                if sp is None:
                    continue
                u = (1 - sp.astype(float)) * g["numel"].astype(float)
                ok = u.notna()
                w = u[ok]
                cov = float((g.loc[ok, col] * w).sum() / w.sum()) if w.sum() > 0 else float("nan")
                rows.append({"run_id": run_id, "method": method, "kind": label, "alpha": a / 100, "coverage": cov,
                             "baseline": a / 100, "enrichment": cov / (a / 100), "changed_entries": float(w.sum()),
                             "n_matrices": int(ok.sum())})
    return pd.DataFrame(rows, columns=cols)


def _coverage(store, sel, ctx):
    df = _coverage_df(store, sel, ctx)
    return F.coverage(df, "Which entries change: coverage of the changed set by low-magnitude and principal "
                          "masks"), df


# ------------------------------------------------------------------------------------ builds: spectra
def _spectra_df(store, sel, ctx, name="spectrum") -> pd.DataFrame:
    tensors = _default_tensors(store, sel, ctx)
    a = _arrays(store, sel, name, tensors) if tensors else pd.DataFrame()
    if a.empty:
        return pd.DataFrame(columns=["run_id", "method", "tensor", "label", "index", "sigma", "delta_sq_sum",
                                     "sigma_over_sigma1", "cumulative_energy"])
    a = _with_label(a)
    # ‖ΔW‖²_F is exact even when the spectrum is a top-q approximation: energies are shares of it
    sq = Q.long_metrics(store, replace(sel, leaves_only=False), ("delta_sq_sum",))
    a = a.merge(sq[["run_id", "tensor", "value"]].rename(columns={"value": "delta_sq_sum"}),
                on=["run_id", "tensor"], how="left")
    a = a.assign(sigma=a["values"].map(np.asarray)).explode("sigma")
    a["index"] = a.groupby(["run_id", "tensor"]).cumcount() + 1
    a["sigma"] = a["sigma"].astype(float)
    # what the figures plot, in the data: σᵢ/σ₁ and the cumulative share of the exact ‖ΔW‖²_F
    a["sigma_over_sigma1"] = a["sigma"] / a.groupby(["run_id", "tensor"])["sigma"].transform("max")
    sq = a["sigma"] ** 2
    total = a["delta_sq_sum"].where(a["delta_sq_sum"] > 0, sq.groupby([a["run_id"], a["tensor"]]).transform("sum"))
    a["cumulative_energy"] = sq.groupby([a["run_id"], a["tensor"]]).cumsum() / total
    return a[["run_id", "method", "tensor", "label", "index", "sigma", "delta_sq_sum", "sigma_over_sigma1",
              "cumulative_energy"]].reset_index(drop=True)


def _spectra(store, sel, ctx):
    df = _spectra_df(store, sel, ctx)
    return F.spectra(df, "Singular spectra of ΔW, normalised by σ₁"), df


def _cumulative(store, sel, ctx):
    df = _spectra_df(store, sel, ctx)
    return F.cumulative_energy(df, "Cumulative energy of ΔW over its singular directions"), df


def _topk(store, sel, ctx):
    df = Q.long_metrics(store, sel, tuple(f"top{k}_energy" for k in TOPK))
    if df.empty:
        return F.empty_figure(title="Top-k energy of ΔW"), df
    df = df.groupby(["run_id", "method", "metric"], dropna=False)["value"].mean().reset_index(name="energy")
    df["k"] = df["metric"].str.extract(r"top(\d+)_energy")[0].astype(int)
    return F.topk_energy(df, "Top-k energy of ΔW (mean over matrices)"), df


def _stable_rank(store, sel, ctx):
    df = S.group_summary(store, sel, by="layer_module", criterion=ctx.criterion, matrix_metrics=("stable_rank",))
    fig = F.layerwise_lines(df, "stable_rank", formatting.label_of("stable_rank"),
                            "Stable rank of ΔW by layer and module", log_y=True)
    return fig, df


# ------------------------------------------------------------------------------------ builds: geometry
def _principal_projection(store, sel, ctx):
    rows = []
    for kind in ("joint", "left", "right"):
        a = _arrays(store, sel, f"proj_{kind}_grid")
        missing = tuple(sorted(set(Q.tensors(store, sel)["run_id"]) - set(a["run_id"])))
        if missing:
            # runs written before the grid arrays existed: put their full by-rank curves on the grid here
            full = _arrays(store, replace(sel, runs=missing), f"proj_{kind}_by_rank")
            full["values"] = [rank_grid(v, min(m, n)) for v, m, n in zip(full["values"], full["rows"], full["cols"])]
            a = pd.concat([a, full], ignore_index=True)
        for (run_id, method), g in a.groupby(["run_id", "method"], dropna=False, sort=False):
            curves = np.vstack([np.asarray(v, dtype=float) for v in g["values"]])
            ok = np.isfinite(curves)
            n_ok = ok.sum(0)
            mean = np.where(ok, curves, 0).sum(0) / np.maximum(n_ok, 1)
            rows += [{"run_id": run_id, "method": method, "kind": kind, "rank_frac": r, "share": m,
                      "n_matrices": int(n), "random_one_side": r, "random_joint": r * r}
                     for r, m, n in zip(PROJ_GRID, mean, n_ok) if n > 0]
    df = pd.DataFrame(rows)
    return F.principal_projection(df, "ΔW energy inside the principal subspaces of W<sub>base</sub>"), df


def _angles(store, sel, ctx):
    tensors = _default_tensors(store, sel, ctx)
    # fetch every default tensor (the Spectra page reads the same rows), show the first
    return _angles_for(store, sel, tensors[:1] if not ctx.tensors else tensors,
                       "Principal angles between W<sub>base</sub> and W<sub>post</sub> subspaces", fetch=tensors)


def _angles_for(store, sel, tensors, title, fetch=None):
    rows = Q.tensor_arrays(store, sel, tuple(fetch or tensors))
    rows = rows[rows["tensor"].isin(tensors)]
    names = set(rows["name"])
    frames = []
    # a k that reaches min(m, n) spans the whole space: every angle is 0 and says nothing, so take the
    # largest k that stays a proper subspace of the chosen tensors
    full = int(np.minimum(rows["rows"], rows["cols"]).min()) if rows["cols"].notna().any() else None
    for side in ("left", "right"):
        ks = sorted((int(n.rsplit("_k", 1)[1]) for n in names if n.startswith(f"angles_{side}_k")), reverse=True)
        if not ks:
            continue
        proper = [k for k in ks if full is None or k < full]
        k = proper[0] if proper else ks[-1]
        a = rows[rows["name"] == f"angles_{side}_k{k}"]
        if a.empty:
            continue
        a = _with_label(a)
        a["label"] = a["label"] + f" · {side} k={k}"
        a = a.assign(angle=a["values"].map(np.asarray)).explode("angle")
        a["index"] = a.groupby(["run_id", "tensor"]).cumcount() + 1
        a["angle_deg"] = np.degrees(a["angle"].astype(float))
        frames.append(a[["run_id", "method", "tensor", "label", "index", "angle_deg"]])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["run_id", "method", "tensor", "label", "index", "angle_deg"])
    return F.principal_angles(df, title), df


def _nss_heatmap(store, sel, ctx):
    df = S.group_summary(store, sel, by="layer_module", criterion=ctx.criterion, matrix_metrics=("nss",))
    df["nss_1e3"] = 1e3 * df["nss"] if len(df) else []
    return F.heatmap(df, "nss_1e3", formatting.label_of("nss", with_unit=False) + " (×10⁻³)",
                     "Normalised spectral shift by layer and module"), df


def _coverage_variants(store, sel, ctx):
    kinds = (("principal_coverage", "principal, r=α·min"), ("principal_coverage_r64", "principal, r=64"),
             ("lowmag_coverage_exact", "low-mag., exact U"))
    df = _coverage_df(store, sel, ctx, kinds)
    return F.coverage(df, "Coverage variants: principal mask rank and exact changed mask"), df


# ------------------------------------------------------------------------------------ builds: tensor
def _tensor_sel(store, sel, ctx) -> tuple[str | None, pd.DataFrame]:
    """The drill-down tensor and the rows of its first selected run that has a changed-entry map."""
    tensor = _pick_tensor(store, sel, ctx)
    if tensor is None:
        return None, pd.DataFrame()
    a = Q.tensor_arrays(store, sel, (tensor,))
    a = a[a["tensor"] == tensor]
    maps = a[a["name"] == "sparsity_map"]
    return tensor, (a[a["run_id"] == maps["run_id"].iloc[0]] if len(maps) else pd.DataFrame())


def _tensor_map(store, sel, ctx):
    tensor, rows_ = _tensor_sel(store, sel, ctx)
    if rows_.empty:
        return F.empty_figure(title="Changed-entry map"), pd.DataFrame()
    run_id = str(rows_["run_id"].iloc[0])
    by_name = {r.name: np.asarray(r.values, dtype=np.float64).reshape([int(x) for x in r.shape] or [-1])
               for r in rows_.itertuples()}
    img = by_name["sparsity_map"]
    shape = (int(rows_["rows"].iloc[0]), int(rows_["cols"].iloc[0])) if rows_["cols"].notna().iloc[0] else None
    fig = F.sparsity_map(img, by_name.get("row_changed_frac"), by_name.get("col_changed_frac"),
                         f"Where {tensor} changed ({run_id})", shape=shape)
    # the data of all three panels, long: the block image, then the per-row and per-column changed shares
    parts = [pd.DataFrame({"what": "block", "block_row": np.repeat(np.arange(img.shape[0]), img.shape[1]),
                           "block_col": np.tile(np.arange(img.shape[1]), img.shape[0]),
                           "changed_frac": np.asarray(img).ravel()})]
    for what, key, col in (("row", "row_changed_frac", "block_row"), ("column", "col_changed_frac", "block_col")):
        if key in by_name:
            v = np.asarray(by_name[key]).ravel()
            parts.append(pd.DataFrame({"what": what, col: np.arange(len(v)), "changed_frac": v}))
    df = pd.concat(parts, ignore_index=True)
    df.insert(0, "tensor", tensor)
    df.insert(0, "run_id", run_id)
    return fig, df


def _tensor_spectrum(store, sel, ctx):
    tensor = _pick_tensor(store, sel, ctx)
    df = _spectra_df(store, replace(sel, leaves_only=False), ViewContext(tensors=(tensor,))) if tensor \
        else pd.DataFrame()
    return F.spectra(df, f"Singular spectrum of ΔW — {tensor}"), df


def _tensor_angles(store, sel, ctx):
    tensor = _pick_tensor(store, sel, ctx)
    return _angles_for(store, replace(sel, leaves_only=False), (tensor,) if tensor else (),
                       f"Principal angles — {tensor}")


def _tensor_sweep(store, sel, ctx):
    tensor = _pick_tensor(store, sel, ctx)
    if tensor is None:
        return F.empty_figure(title="Sparsity against ε"), pd.DataFrame()
    s, e = _arrays(store, sel, "abs_sweep_sparsity", (tensor,)), _arrays(store, sel, "abs_sweep_eps", (tensor,))
    if s.empty or e.empty:
        return F.empty_figure(title=f"Sparsity against ε — {tensor}"), pd.DataFrame()
    rows = [{"run_id": r.run_id, "method": r.method, "eps": eps, "sparsity": v}
            for r in s.itertuples() for eps, v in zip(e["values"].iloc[0], r.values)]
    df = pd.DataFrame(rows)
    mark = float(ctx.criterion.split("_")[1]) if ctx.criterion.startswith("abs_") else None
    return F.sweep(df, f"Sparsity against ε — {tensor}", mark_eps=mark), df


def _tensor_deciles(store, sel, ctx):
    tensor = _pick_tensor(store, sel, ctx)
    df = _numel_weighted_arrays(store, replace(sel, leaves_only=False), "decile_density", (tensor,)) \
        .rename(columns={"value": "density"}) if tensor else pd.DataFrame()
    if df.empty:
        return F.empty_figure(title="Update density by decile"), df
    df["decile"] = df["i"] + 1
    df["relative"] = df["density"] / df.groupby("run_id")["density"].transform("mean")
    return F.decile_profile(df, f"Update density by decile of |W<sub>base</sub>| — {tensor}"), df


# ------------------------------------------------------------------------------------ builds: compare
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
    return f"sparsity ({_criterion_label(ctx.criterion)})" if ctx.metric == "sparsity" else ctx.metric


def _compare_bars(store, sel, ctx):
    df = metric_frame(store, sel, ctx, "module")
    if not df.empty:
        df = df.assign(module=df["module"].astype(str))
        order = sorted(df["module"].unique(), key=F.module_sort_key)
        df = df.set_index("module").loc[order].reset_index()
    return F.bars(df, "module", "value", f"{_compare_name(ctx)} per module", "module",
                  metric_label(ctx.metric, ctx.criterion)), df


def _compare_layerwise(store, sel, ctx):
    df = metric_frame(store, sel, ctx, "layer")
    return F.layerwise_lines(df, "value", metric_label(ctx.metric, ctx.criterion), f"{_compare_name(ctx)} by layer",
                             color="run_id", facet=None), df


def _compare_difference(store, sel, ctx):
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
    return F.difference_heatmap(m, "difference", f"Δ {metric_label(ctx.metric, ctx.criterion)}", title,
                                text=m["layer"].nunique() <= 8), m


# ------------------------------------------------------------------------------------ registry
_CRIT = "An entry counts as changed under the chosen criterion (default |ΔW| > 1e-5); sparsity = share unchanged."
FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("overview.sparsity_heatmap", "overview", "Sparsity by layer and module",
               "Share of entries of ΔW = W_post − W_base left unchanged, per layer (rows) and module (columns), "
               "one panel per run, numel-weighted over fused parts. " + _CRIT, _sparsity_heatmap),
    FigureSpec("overview.energy_share", "overview", "Update energy per module",
               "Share of each run's squared Frobenius norm ‖ΔW‖²_F held by each module type, summed over layers "
               "(bars sum to 100 % per run).", _energy_share),
    FigureSpec("overview.coverage", "overview", "Low-magnitude and principal coverage",
               "Coverage |M_α ∩ U| / |U| of the changed set U by the α·numel smallest-|W_base| entries "
               "(low-magnitude) and by the α·numel largest entries of the rank-⌊α·min(m,n)⌋ reconstruction of "
               "W_base (principal), pooled over matrices by |U|. Dotted: random baseline coverage = α; "
               "enrichment = coverage/α.", _coverage),
    FigureSpec("sparsity.layerwise", "sparsity", "Layerwise sparsity per projection",
               "Share of entries unchanged per layer, one line per module, one panel per run. " + _CRIT, _layerwise),
    FigureSpec("sparsity.criteria", "sparsity", "Sparsity under each criterion",
               "Numel-weighted share of entries unchanged under every stored criterion: bitwise, absolute "
               "thresholds ε, thresholds relative to RMS(W_base), and the bf16-resolution test "
               "|ΔW| > η·max(|W_base|, |W_post|).", _criteria),
    FigureSpec("sparsity.sweep", "sparsity", "Sparsity against threshold",
               "Share of entries with |ΔW| ≤ ε against ε (log scale), numel-weighted over the selection; the dotted "
               "line marks the chosen criterion.", _sweep),
    FigureSpec("sparsity.deciles", "sparsity", "Update density by magnitude decile",
               "Share of entries changed within each decile of |W_base| (1 = smallest magnitudes), divided by the "
               "tensor's mean density; 1 (dotted) = no preference for small or large weights.", _deciles),
    FigureSpec("sparsity.rel_change_heatmap", "sparsity", "Relative change by layer and module",
               "‖ΔW‖_F / ‖W_base‖_F per layer and module, pooled as sqrt(ΣΔ²)/sqrt(ΣW²), in units of 10⁻³.",
               _rel_change_heatmap),
    FigureSpec("spectra.normalised", "spectra", "Normalised ΔW spectra",
               "Singular values σᵢ of ΔW divided by σ₁, log–log, for the chosen tensors (default: a middle-layer "
               "attention q and FFN down projection).", _spectra),
    FigureSpec("spectra.cumulative", "spectra", "Cumulative spectral energy",
               "Σ_{j≤i} σⱼ² / ‖ΔW‖²_F against the number of singular directions i (log scale); a low-rank update "
               "reaches 100 % early.", _cumulative),
    FigureSpec("spectra.topk", "spectra", "Top-k energy",
               "Share of ‖ΔW‖²_F in the top k singular directions, k = 1…64, mean over matrices.", _topk),
    FigureSpec("spectra.stable_rank", "spectra", "Stable rank by layer and module",
               "Stable rank ‖ΔW‖²_F / σ₁² per layer (log scale), one line per module, one panel per run; "
               "mean over matrices in a cell.", _stable_rank),
    FigureSpec("geometry.principal_projection", "geometry", "Projection on principal subspaces",
               "Share of ‖ΔW‖²_F inside the top-k singular subspaces of W_base against r = k/min(m,n): joint "
               "‖U_kᵀΔW V_k‖²_F, left ‖U_kᵀΔW‖²_F, right ‖ΔW V_k‖²_F, mean over matrices. Dotted: an isotropic "
               "random ΔW of a square matrix (r one-sided, r² joint; k/m, k/n, k²/mn for m×n).",
               _principal_projection),
    FigureSpec("geometry.angles", "geometry", "Principal angles",
               "Principal angles (degrees) between the top-k left and right singular subspaces of W_base and "
               "W_post, computed in float64, for the chosen tensor (the largest stored k below min(m, n): at a k that spans a side's whole space the angles are undefined and stored as NaN).", _angles),
    FigureSpec("geometry.nss_heatmap", "geometry", "Normalised spectral shift",
               "NSS = ‖σ(W_post) − σ(W_base)‖ / ‖σ(W_base)‖ per layer and module (×10⁻³), one panel per run.",
               _nss_heatmap),
    FigureSpec("geometry.coverage_variants", "geometry", "Coverage variants",
               "Principal coverage with the mask from the rank-⌊α·min(m,n)⌋ (2606.13657) and rank-64 (2511.08567) "
               "reconstructions of W_base, and low-magnitude coverage of the bitwise-changed set; dotted: "
               "random baseline = α.", _coverage_variants),
    FigureSpec("tensor.sparsity_map", "tensor", "Changed-entry map",
               "Share of entries changed in blocks of the matrix (at most 128×128 blocks), with the per-column "
               "(top) and per-row (right) changed shares, for the chosen tensor and the first selected run.",
               _tensor_map),
    FigureSpec("tensor.spectrum", "tensor", "Tensor ΔW spectrum",
               "Singular values of ΔW for the chosen tensor, σᵢ/σ₁, log–log, one line per run.", _tensor_spectrum),
    FigureSpec("tensor.angles", "tensor", "Tensor principal angles",
               "Principal angles (degrees) between W_base and W_post singular subspaces for the chosen tensor.",
               _tensor_angles),
    FigureSpec("tensor.sweep", "tensor", "Tensor sparsity against threshold",
               "Share of entries of the chosen tensor with |ΔW| ≤ ε, against ε (log scale).", _tensor_sweep),
    FigureSpec("tensor.deciles", "tensor", "Tensor update density by decile",
               "Update density per decile of |W_base| for the chosen tensor, relative to its mean (1 = uniform).",
               _tensor_deciles),
    FigureSpec("compare.bars", "compare", "Metric per module",
               "The chosen metric per module for each run, pooled over the module's matrices by the metric's own "
               "rule from the catalog (the axis says which: parameter-weighted for sparsity, weighted by the changed "
               "entries for coverage, energy-weighted for coordinate energy, pooled sums for relative change, the "
               "mean over matrices for spectral and geometry scalars).", _compare_bars),
    FigureSpec("compare.layerwise", "compare", "Metric by layer",
               "The chosen metric per layer, one line per run (colour = method), pooled over the layer's matrices "
               "by the metric's catalog rule.", _compare_layerwise),
    FigureSpec("compare.difference", "compare", "Difference heatmap",
               "Run B minus run A for the chosen metric, per layer and module; diverging colour scale centred on 0 "
               "(purple: B higher, orange: A higher).", _compare_difference),
)


def figures_for(page: str) -> tuple[FigureSpec, ...]:
    """The FigureSpecs of one page, in display order."""
    if page not in PAGES:
        raise ValueError(f"unknown page {page!r}; pages are {', '.join(PAGES)}")
    return tuple(f for f in FIGURES if f.page == page)


def figure_spec(key: str) -> FigureSpec:
    for f in FIGURES:
        if f.key == key:
            return f
    raise KeyError(f"no figure {key!r}; known: {', '.join(f.key for f in FIGURES)}")


# ------------------------------------------------------------------------------------ tables
def overview_table(store: Store, sel: Selection, ctx: ViewContext) -> pd.DataFrame:
    """One row per run, like the main table of 2606.13657: method, relative change (pooled: sqrt(ΣΔ²)/sqrt(ΣW²)),
    sparsity under ``ctx.criterion`` (parameter-weighted), top-16 energy and stable rank (unweighted means over
    matrices, as the Spectra figures), principal and low-magnitude coverage at α = 10 % pooled by |U| (the
    coverage figure's numbers) with the random baseline 0.10 and the enrichment coverage/0.10, the number of
    matrices whose spectrum is approximate (``approx_spectra``), and accuracy from ``runs.extra`` if present."""
    mm = ("top16_energy", "stable_rank", "principal_coverage_10pct", "lowmag_coverage_10pct")
    s = S.run_summary(store, sel, criterion=ctx.criterion, matrix_metrics=mm)
    spars = f"sparsity_{ctx.criterion}"
    cols = ["run_id", "method", "status", "n_tensors", "rel_change", spars, *mm[:2], "principal_coverage_10pct",
            "principal_enrichment_10pct", "lowmag_coverage_10pct", "lowmag_enrichment_10pct", "random_baseline_10pct",
            "approx_spectra", "accuracy", "base_accuracy", "accuracy_gain"]
    if s.empty:
        return pd.DataFrame(columns=cols)
    s = s.rename(columns={"sparsity": spars})
    for m in mm:
        if m not in s:
            s[m] = np.nan
    # coverage: pooled over matrices by |U| exactly as the coverage figure pools it (one definition)
    cov = _coverage_df(store, sel, ctx)
    cov = cov[np.isclose(cov["alpha"].astype(float), 0.10)] if len(cov) else cov
    for kind, col in (("principal mask", "principal_coverage_10pct"), ("low-magnitude mask", "lowmag_coverage_10pct")):
        part = cov[cov["kind"] == kind].set_index("run_id")["coverage"] if len(cov) else pd.Series(dtype=float)
        s[col] = s["run_id"].map(part).astype(float)
    s["random_baseline_10pct"] = 0.10
    s["principal_enrichment_10pct"] = s["principal_coverage_10pct"] / 0.10
    s["lowmag_enrichment_10pct"] = s["lowmag_coverage_10pct"] / 0.10
    exact = Q.long_metrics(store, sel, ("spectrum_exact",))
    n_approx = (exact["value"] == 0).groupby(exact["run_id"]).sum() if len(exact) else pd.Series(dtype=float)
    s["approx_spectra"] = s["run_id"].map(n_approx).fillna(0).astype(int)
    runs = Q.runs(store).set_index("run_id")
    s["status"] = s["run_id"].map(runs["status"])
    extra = {r: _json(runs.at[r, "extra"]) for r in s["run_id"] if r in runs.index}
    for key in ("accuracy", "base_accuracy"):
        s[key] = [_num(extra.get(r, {}).get(key)) for r in s["run_id"]]
    s["accuracy_gain"] = s["accuracy"] - s["base_accuracy"]
    return s[cols].reset_index(drop=True)


def provenance(store: Store, run_id: str) -> dict:
    """Where a run's results came from: paths, fingerprints, sizes, options, versions, device, dtype, seed,
    status, times and tensor counts. Empty dict when the run is unknown."""
    row = store.run_row(run_id)
    if row is None:
        return {}
    out = {k: _plain(row.get(k)) for k in (
        "run_id", "method", "kind", "base_path", "post_path", "base_fingerprint", "post_fingerprint", "base_bytes",
        "post_bytes", "device", "dtype", "seed", "status", "error", "created_at", "finished_at", "wall_s",
        "n_tensors", "n_done", "n_skipped", "n_failed", "bytes_total", "bytes_done")}
    out["options"] = _json(row.get("options"))
    out["versions"] = _json(row.get("versions"))
    out["extra"] = _json(row.get("extra"))
    return out


def _json(text) -> dict:
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _plain(v):
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NaT:
        return None
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    if isinstance(v, np.generic):
        return v.item()
    return v


def approx_counts(store: Store, sel: Selection) -> dict[str, int]:
    """run_id → how many selected matrices have an approximate (randomized top-k) spectrum; runs with
    none are left out. Their spectral and geometry numbers are approximate (README: exact and approximate)."""
    df = Q.long_metrics(store, replace(sel, leaves_only=False), ("spectrum_exact",))
    if df.empty:
        return {}
    n = (df["value"] == 0).groupby(df["run_id"]).sum()
    return {str(r): int(c) for r, c in n.items() if c}
