"""Plotly builders for the spectra and geometry figures: singular spectra, cumulative and top-k energy,
principal projections and angles, coverage curves. Built on the line and baseline helpers of
``opdviz.views.figures``; pure functions of DataFrames, like every builder."""

from __future__ import annotations


import numpy as np
import pandas as pd
import plotly.graph_objects as go

from opdviz.views import figures as F


def spectra(df: pd.DataFrame, title: str) -> go.Figure:
    """ΔW singular spectra normalised σᵢ/σ₁ against i, log–log.

    Columns: run_id, method, label (which tensor), index (1-based), sigma."""
    if df.empty:
        return F.empty_figure(title=title)
    d = df.copy()
    d["norm"] = d["sigma_over_sigma1"] if "sigma_over_sigma1" in d else \
        d["sigma"] / d.groupby(["run_id", "label"])["sigma"].transform("max")
    d = _thin_log(d)
    d = d[d["norm"] > 0]
    return F.lines(d, "index", "norm", "run_id", title, "singular value index i (log scale)",
                  "σᵢ(ΔW) / σ₁(ΔW) (log scale)", dash="label", log_x=True, log_y=True)


def cumulative_energy(df: pd.DataFrame, title: str) -> go.Figure:
    """Share of ‖ΔW‖²_F in the top-i singular directions, Σ_{j≤i} σⱼ² / Σ σⱼ², against i (log x).

    Columns: run_id, method, label, index (1-based), sigma; optional delta_sq_sum (exact ‖ΔW‖²_F, the
    denominator when the spectrum is a top-q approximation)."""
    if df.empty:
        return F.empty_figure(title=title)
    if "cumulative_energy" in df:  # computed on the whole spectrum: thin first, then sort what is drawn
        d = _thin_log(df).sort_values(["run_id", "label", "index"])
        d = d.assign(energy=100 * d["cumulative_energy"])
    else:
        d = df.sort_values(["run_id", "label", "index"]).copy()
        sq = d["sigma"] ** 2
        total = sq.groupby([d["run_id"], d["label"]]).transform("sum")
        if "delta_sq_sum" in d:    # exact ‖ΔW‖²_F: right for a top-q (approximate) spectrum too
            total = d["delta_sq_sum"].where(d["delta_sq_sum"] > 0, total)
        d["energy"] = 100 * (sq.groupby([d["run_id"], d["label"]]).cumsum() / total)
        d = _thin_log(d)
    fig = F.lines(d, "index", "energy", "run_id", title, "number of singular directions i (log scale)",
                 "cumulative energy of ΔW (% of ‖ΔW‖²<sub>F</sub>)", dash="label", log_x=True)
    fig.update_yaxes(range=[0, 101])
    return fig


def topk_energy(df: pd.DataFrame, title: str) -> go.Figure:
    """Mean top-k energy share against k (log₂ x). Columns: run_id, method, k, energy (fraction)."""
    if df.empty:
        return F.empty_figure(title=title)
    d = df.assign(energy_pct=100 * df["energy"])
    fig = F.lines(d, "k", "energy_pct", "run_id", title, "k, top singular directions (log scale)",
                 "top-k energy of ΔW (% of ‖ΔW‖²<sub>F</sub>)", log_x=True, markers=True)
    fig.update_xaxes(tickvals=sorted(d["k"].unique()))
    fig.update_yaxes(range=[0, 101])
    return fig


def principal_projection(df: pd.DataFrame, title: str) -> go.Figure:
    """Share of ‖ΔW‖²_F inside the top-k singular subspaces of W_base against r = k/min(m, n).

    Columns: run_id, method, kind (joint / left / right), rank_frac (fraction), share (fraction).
    Random baselines (an isotropic ΔW of a square matrix): left or right r, joint r²; for an m×n
    matrix they are k/m, k/n and k²/(mn)."""
    if df.empty:
        return F.empty_figure(title=title)
    d = df.assign(rank_pct=100 * df["rank_frac"], share_pct=100 * df["share"])
    fig = F.lines(d, "rank_pct", "share_pct", "run_id", title,
                 "subspace rank r = k/min(m,n) (%)",
                 "ΔW energy in subspace (%)", dash="kind", log_x=True,
                 log_y=True)
    r = np.geomspace(max(d["rank_frac"].min(), 1e-4), 1, 60)
    kinds = set(d["kind"])
    if kinds & {"left", "right"}:
        F.baseline(fig, 100 * r, 100 * r, "random, one side (r)")
    if "joint" in kinds:
        F.baseline(fig, 100 * r, 100 * r**2, "random, joint (r²)")
        fig.data[-1].line.dash = "dashdot"
    return fig


def _thin_log(d: pd.DataFrame, points: int = 300) -> pd.DataFrame:
    """Keep ~``points`` log-spaced indices per curve (a 4096-point spectrum on a log axis draws the same,
    and the exported SVG/PDF stays small). Column ``index`` is 1-based."""
    n = int(d["index"].max()) if len(d) else 0
    if n <= points:
        return d
    keep = np.unique(np.round(np.geomspace(1, n, points)).astype(int))
    return d[d["index"].isin(keep)]


def principal_angles(df: pd.DataFrame, title: str) -> go.Figure:
    """Principal angles between the top-k singular subspaces of W_base and W_post, in degrees.

    Columns: run_id, method, label (tensor · side · k), index (1-based), angle_deg."""
    if df.empty:
        return F.empty_figure(title=title)
    return F.lines(df, "index", "angle_deg", "run_id", title, "principal angle index i",
                  "principal angle θᵢ (degrees)", dash="label")


def coverage(df: pd.DataFrame, title: str) -> go.Figure:
    """Coverage |M_α ∩ U| / |U| of the changed set U by a mask M_α of α·numel entries, against α,
    one panel per mask kind, with the random baseline coverage = α.

    Columns: run_id, method, kind (e.g. "low-magnitude", "principal"), alpha (fraction), coverage (fraction)."""
    if df.empty:
        return F.empty_figure(title=title)
    d = df.assign(alpha_pct=100 * df["alpha"], coverage_pct=100 * df["coverage"])
    fig = F.lines(d, "alpha_pct", "coverage_pct", "run_id", title, "mask size α (% of entries)",
                 "coverage of changed entries (%)", facet="kind", markers=True)
    kinds = F.ordered(d["kind"], "run")
    ncols = min(len(kinds), 3)
    a = np.array([0, 100])
    for i, _ in enumerate(kinds):
        F.baseline(fig, a, a, "random (coverage = α)", row=i // ncols + 1, col=i % ncols + 1, showlegend=i == 0)
    fig.update_xaxes(range=[0, 52])
    fig.update_yaxes(range=[0, 101])
    return fig
