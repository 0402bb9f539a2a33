"""Builds of the Overview and Sparsity pages: where ΔW is sparse, by layer, module, criterion, threshold and
magnitude decile, and how the changed set is covered by low-magnitude and principal masks (``coverage_frame``,
which the Overview table and the Geometry page share)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from opdviz.store import Store
from opdviz.store import queries as Q
from opdviz.store import summary as S
from opdviz.options import DEFAULT_CRITERIA
from opdviz.views import drilldown as D
from opdviz.views import figures as F
from opdviz.views import figures_spectral as FS
from opdviz.views import formatting
from opdviz.views.context import ViewContext

CRITERIA = DEFAULT_CRITERIA
ALPHAS = (1, 5, 10, 20, 30, 50)


def sparsity_heatmap(store, sel, ctx):
    df = S.group_summary(store, sel, by="layer_module", criterion=ctx.criterion)
    df["sparsity_pct"] = 100 * df["sparsity"] if len(df) else []
    fig = F.heatmap(df, "sparsity_pct", formatting.label_of(f"sparsity_{ctx.criterion}"),
                    f"Sparsity of ΔW by layer and module ({formatting.criterion_label(ctx.criterion)} counts as changed)")
    return fig, df


def energy_share(store, sel, ctx):
    df = S.group_summary(store, sel, by="module", criterion=ctx.criterion)
    return F.energy_shares(df, "Where the update energy goes: share of ‖ΔW‖²<sub>F</sub> per module"), df


def criteria(store, sel, ctx):
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
    agg["criterion_label"] = agg["criterion"].map(formatting.criterion_label)
    agg = agg[["run_id", "method", "criterion", "criterion_label", "sparsity", "numel"]]
    fig = F.bars(agg, "criterion_label", "sparsity", "Sparsity of ΔW under each criterion (numel-weighted)",
                 "entry counts as changed when", formatting.axis_title("sparsity_exact"), percent=True)
    fig.update_xaxes(tickangle=-30)
    return fig, agg


def layerwise(store, sel, ctx):
    df = S.group_summary(store, sel, by="layer_module", criterion=ctx.criterion)
    df["sparsity_pct"] = 100 * df["sparsity"] if len(df) else []
    fig = F.layerwise_lines(df, "sparsity_pct", formatting.label_of(f"sparsity_{ctx.criterion}"),
                            f"Layerwise sparsity per projection ({formatting.criterion_label(ctx.criterion)})")
    return fig, df


def sweep(store, sel, ctx):
    df = D.numel_weighted_arrays(store, sel, "abs_sweep_sparsity")
    eps = D.arrays_of(store, sel, "abs_sweep_eps")
    if df.empty or eps.empty:
        return F.empty_figure(title="Sparsity against the threshold ε"), df
    grid = np.asarray(eps["values"].iloc[0])
    df = df[df["i"] < len(grid)].assign(eps=lambda d: grid[d["i"].to_numpy()]).rename(columns={"value": "sparsity"})
    mark = float(ctx.criterion.split("_")[1]) if ctx.criterion.startswith("abs_") else None
    return F.sweep(df, "Sparsity against the threshold ε on |ΔW| (numel-weighted)", mark_eps=mark), df


def deciles(store, sel, ctx):
    df = D.numel_weighted_arrays(store, sel, "decile_density").rename(columns={"value": "density"})
    if df.empty:
        return F.empty_figure(title="Update density by magnitude decile of W_base"), df
    df["decile"] = df["i"] + 1
    df["relative"] = df["density"] / df.groupby("run_id")["density"].transform("mean")
    df["density_label"] = [f"{100 * v:.2f}% of entries changed" for v in df["density"]]
    return F.decile_profile(df, "Update density by decile of |W<sub>base</sub>|"), df


def rel_change_heatmap(store, sel, ctx):
    df = S.group_summary(store, sel, by="layer_module", criterion=ctx.criterion)
    df["rel_change_1e3"] = 1e3 * df["rel_change"] if len(df) else []
    return F.heatmap(df, "rel_change_1e3", formatting.label_of("rel_change", with_unit=False) + " (×10⁻³)",
                     "Relative change by layer and module"), df


def _mask_criteria(store: Store, run_ids) -> dict[str, str]:
    """run_id → the criterion its default changed mask U used (``options.criterion`` at compute time):
    the coverage metrics are shares of that U, whatever criterion the sidebar shows."""
    rows = store.run_rows()
    return {run_id: str(formatting.json_dict(rows.get(run_id, {}).get("options")).get("criterion")
                        or ViewContext().criterion) for run_id in run_ids}


def coverage_frame(store, sel, ctx, kinds=(("lowmag_coverage", "low-magnitude mask"),
                                         ("principal_coverage", "principal mask"))) -> pd.DataFrame:
    """Model-level coverage per run, kind and α: the share of the run's changed entries U (pooled over the
    selected matrices) that fall in the masks, Σ|M∩U| / Σ|U| = Σ coverage·|U| / Σ|U| — the same number
    for the Overview table, this figure, its CSV and a recomputation from ``opdviz metrics``. U is the
    run's default mask (``options.criterion``), or the bitwise mask for the ``_exact`` variants.

    Kept per store version in the store's memo (the Overview table and its coverage figure both ask)."""
    kinds = tuple(tuple(k) for k in kinds)
    memo = getattr(store, "memo", None)
    if memo is None:
        return _coverage_frame(store, sel, kinds)
    key = (str(store.db_path), store.version(), "coverage_frame", sel, kinds)
    return memo.get(key, lambda: _coverage_frame(store, sel, kinds))


_COVERAGE_COLUMNS = ["run_id", "method", "kind", "alpha", "coverage", "baseline", "enrichment", "changed_entries",
                     "n_matrices"]


def _coverage_frame(store, sel, kinds) -> pd.DataFrame:
    names = tuple(f"{p}_{a}pct" for p, _ in kinds for a in ALPHAS)
    base = Q.long_metrics(store, sel, names)
    base = base[base["value"].notna()]
    if base.empty:
        return pd.DataFrame(columns=_COVERAGE_COLUMNS)
    crits = _mask_criteria(store, base["run_id"].unique())
    spars = tuple(sorted({f"sparsity_{c}" for c in crits.values()} | {"sparsity_exact"}))
    sp = Q.long_metrics(store, sel, spars)
    sp = sp.loc[sp["value"].notna(), ["run_id", "tensor", "metric", "value"]]
    present = set(sp["metric"])               # a mask whose sparsity no matrix stores is left out
    # |U| per matrix under each run's own mask (the bitwise one for the _exact variants)
    own = sp[sp["metric"].to_numpy() == ("sparsity_" + sp["run_id"].map(crits)).to_numpy()]
    own = own.drop_duplicates(["run_id", "tensor"]).set_index(["run_id", "tensor"])["value"]
    exact = sp[sp["metric"] == "sparsity_exact"].drop_duplicates(["run_id", "tensor"])
    exact = exact.set_index(["run_id", "tensor"])["value"]
    spec = {f"{p}_{a}pct": (k, label, a, p.endswith("_exact"))
            for k, (p, label) in enumerate(kinds) for a in ALPHAS}
    meta = pd.DataFrame.from_dict(spec, orient="index", columns=["order", "kind", "alpha", "exact"])
    df = base.join(meta, on="metric")
    at = pd.MultiIndex.from_frame(df[["run_id", "tensor"]])
    exact_rows = df["exact"].to_numpy(dtype=bool)
    sparsity = np.where(exact_rows, exact.reindex(at).to_numpy(dtype=float), own.reindex(at).to_numpy(dtype=float))
    allowed = np.where(exact_rows, "sparsity_exact" in present,
                       ("sparsity_" + df["run_id"].map(crits)).isin(present).to_numpy())
    df = df[allowed]
    w = ((1 - sparsity[allowed]) * df["numel"].to_numpy(dtype=float))       # NaN where the mask is missing
    df = df.assign(w=w, cw=df["value"].to_numpy(dtype=float) * w, n=~np.isnan(w))
    agg = df.groupby(["order", "alpha", "kind", "run_id", "method"], dropna=False, sort=True)[["w", "cw", "n"]].sum()
    agg = agg.reset_index()
    if agg.empty:
        return pd.DataFrame(columns=_COVERAGE_COLUMNS)
    cov = (agg["cw"] / agg["w"]).where(agg["w"] > 0).to_numpy(dtype=float)
    alpha = agg["alpha"].to_numpy(dtype=float) / 100
    return pd.DataFrame({"run_id": agg["run_id"], "method": agg["method"], "kind": agg["kind"], "alpha": alpha,
                         "coverage": cov, "baseline": alpha, "enrichment": cov / alpha,
                         "changed_entries": agg["w"].to_numpy(dtype=float),
                         "n_matrices": agg["n"].to_numpy(dtype=int)})[_COVERAGE_COLUMNS]


def coverage(store, sel, ctx):
    df = coverage_frame(store, sel, ctx)
    return FS.coverage(df, "Which entries change: coverage of the changed set by low-magnitude and principal "
                          "masks"), df
