"""Builds of the Spectra and Geometry pages: singular spectra of ΔW, top-k energy, stable rank, energy in
the principal subspaces of W_base, principal angles, spectral shift and coverage variants."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from opdviz.store import queries as Q
from opdviz.store import summary as S
from opdviz.views import drilldown as D
from opdviz.views import figures as F
from opdviz.views import figures_spectral as FS
from opdviz.views import formatting
from opdviz.metrics.rankgrid import PROJ_GRID, rank_grid
from opdviz.views.sparsity import coverage_frame

TOPK = (1, 2, 4, 8, 16, 32, 64)


SPECTRA_COLUMNS = ["run_id", "method", "tensor", "label", "index", "sigma", "delta_sq_sum", "sigma_over_sigma1",
                   "cumulative_energy"]


def spectra_frame(store, sel, ctx, name="spectrum") -> pd.DataFrame:
    """One row per singular value of the chosen tensors' ``name`` arrays: index (1-based), sigma, σᵢ/σ₁ and the
    cumulative share of the exact ‖ΔW‖²_F. Kept per store version in the store's memo (the Spectra page's
    two spectrum figures read the same frame)."""
    memo = getattr(store, "memo", None)
    if memo is None:
        return _spectra_frame(store, sel, ctx, name)
    key = (str(store.db_path), store.version(), "spectra_frame", sel, tuple(ctx.tensors), name)
    return memo.get(key, lambda: _spectra_frame(store, sel, ctx, name))


def _spectra_frame(store, sel, ctx, name) -> pd.DataFrame:
    tensors = D.default_tensors(store, sel, ctx)
    a = D.arrays_of(store, sel, name, tensors) if tensors else pd.DataFrame()
    if a.empty:
        return pd.DataFrame(columns=SPECTRA_COLUMNS)
    a = D.with_label(a)
    # ‖ΔW‖²_F is exact even when the spectrum is a top-q approximation: energies are shares of it
    sq = Q.long_metrics(store, replace(sel, leaves_only=False), ("delta_sq_sum",))
    a = a.merge(sq[["run_id", "tensor", "value"]].rename(columns={"value": "delta_sq_sum"}),
                on=["run_id", "tensor"], how="left")
    return _spectra_rows(a)


def _spectra_rows(a: pd.DataFrame) -> pd.DataFrame:
    """The spectra frame of ``a`` (one row per run and tensor: values, delta_sq_sum and the labels)."""
    if a.duplicated(["run_id", "tensor"]).any():       # never from one array name; keep the general path
        return _spectra_frame_grouped(a)
    # one spectrum per row: the per-spectrum index, max, sums and running sums over contiguous segments
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in a["values"]]
    arrays = [v if v.size else np.array([np.nan]) for v in arrays]
    sizes = np.array([v.size for v in arrays])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sigma = np.concatenate(arrays)
    out = a[["run_id", "method", "tensor", "label", "delta_sq_sum"]].iloc[np.repeat(np.arange(len(a)), sizes)]
    out = out.reset_index(drop=True)
    out["index"] = np.arange(len(sigma)) - np.repeat(starts, sizes) + 1
    out["sigma"] = sigma
    with np.errstate(invalid="ignore", divide="ignore"):
        out["sigma_over_sigma1"] = sigma / np.repeat(np.fmax.reduceat(sigma, starts), sizes)
        sq = sigma ** 2
        known = np.where(np.isnan(sq), 0.0, sq)
        running = np.cumsum(known)
        running = running - np.repeat(running[starts] - known[starts], sizes)
        running[np.isnan(sq)] = np.nan
        exact = out["delta_sq_sum"].to_numpy(dtype=float)
        total = np.where(exact > 0, exact, np.repeat(np.add.reduceat(known, starts), sizes))
        out["cumulative_energy"] = running / total
    return out[SPECTRA_COLUMNS]


def _spectra_frame_grouped(a: pd.DataFrame) -> pd.DataFrame:
    a = D.explode_values(a[["run_id", "method", "tensor", "label", "delta_sq_sum", "values"]], "sigma")
    a["index"] = a.groupby(["run_id", "tensor"]).cumcount() + 1
    # what the figures plot, in the data: σᵢ/σ₁ and the cumulative share of the exact ‖ΔW‖²_F
    a["sigma_over_sigma1"] = a["sigma"] / a.groupby(["run_id", "tensor"])["sigma"].transform("max")
    sq = a["sigma"] ** 2
    total = a["delta_sq_sum"].where(a["delta_sq_sum"] > 0, sq.groupby([a["run_id"], a["tensor"]]).transform("sum"))
    a["cumulative_energy"] = sq.groupby([a["run_id"], a["tensor"]]).cumsum() / total
    return a[SPECTRA_COLUMNS].reset_index(drop=True)


def spectra(store, sel, ctx):
    df = spectra_frame(store, sel, ctx)
    return FS.spectra(df, "Singular spectra of ΔW, normalised by σ₁"), df


def cumulative(store, sel, ctx):
    df = spectra_frame(store, sel, ctx)
    return FS.cumulative_energy(df, "Cumulative energy of ΔW over its singular directions"), df


def topk(store, sel, ctx):
    df = Q.long_metrics(store, sel, tuple(f"top{k}_energy" for k in TOPK))
    if df.empty:
        return F.empty_figure(title="Top-k energy of ΔW"), df
    df = df.groupby(["run_id", "method", "metric"], dropna=False)["value"].mean().reset_index(name="energy")
    df["k"] = df["metric"].str.extract(r"top(\d+)_energy")[0].astype(int)
    return FS.topk_energy(df, "Top-k energy of ΔW (mean over matrices)"), df


def stable_rank(store, sel, ctx):
    df = S.group_summary(store, sel, by="layer_module", criterion=ctx.criterion, matrix_metrics=("stable_rank",))
    fig = F.layerwise_lines(df, "stable_rank", formatting.label_of("stable_rank"),
                            "Stable rank of ΔW by layer and module", log_y=True)
    return fig, df


# ------------------------------------------------------------------------------------ builds: geometry
def principal_projection(store, sel, ctx):
    rows = []
    for kind in ("joint", "left", "right"):
        a = D.arrays_of(store, sel, f"proj_{kind}_grid")
        missing = tuple(sorted(set(Q.tensors(store, sel)["run_id"]) - set(a["run_id"])))
        if missing:
            # runs written before the grid arrays existed: put their full by-rank curves on the grid here
            full = D.arrays_of(store, replace(sel, runs=missing), f"proj_{kind}_by_rank")
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
    return FS.principal_projection(df, "ΔW energy inside the principal subspaces of W<sub>base</sub>"), df


def angles(store, sel, ctx):
    tensors = D.default_tensors(store, sel, ctx)
    # fetch every default tensor (the Spectra page reads the same rows), show the first
    return angles_for(store, sel, tensors[:1] if not ctx.tensors else tensors,
                       "Principal angles between W<sub>base</sub> and W<sub>post</sub> subspaces", fetch=tensors)


def angles_for(store, sel, tensors, title, fetch=None):
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
        a = D.with_label(a)
        a["label"] = a["label"] + f" · {side} k={k}"
        a = D.explode_values(a, "angle")
        a["index"] = a.groupby(["run_id", "tensor"]).cumcount() + 1
        a["angle_deg"] = np.degrees(a["angle"])
        frames.append(a[["run_id", "method", "tensor", "label", "index", "angle_deg"]])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["run_id", "method", "tensor", "label", "index", "angle_deg"])
    return FS.principal_angles(df, title), df


def nss_heatmap(store, sel, ctx):
    df = S.group_summary(store, sel, by="layer_module", criterion=ctx.criterion, matrix_metrics=("nss",))
    df["nss_1e3"] = 1e3 * df["nss"] if len(df) else []
    return F.heatmap(df, "nss_1e3", formatting.label_of("nss", with_unit=False) + " (×10⁻³)",
                     "Normalised spectral shift by layer and module"), df


def coverage_variants(store, sel, ctx):
    kinds = (("principal_coverage", "principal, r=α·min"), ("principal_coverage_r64", "principal, r=64"),
             ("lowmag_coverage_exact", "low-mag., exact U"))
    df = coverage_frame(store, sel, ctx, kinds)
    return FS.coverage(df, "Coverage variants: principal mask rank and exact changed mask"), df
