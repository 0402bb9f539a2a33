"""The lab page's data and figures: when does the update become sparse?

``sweep_table`` turns ``opdviz.store.lab.lab_runs`` (one row per sweep run and block) into one row per run with
its settings (from ``runs.extra``) and whole-model numbers; the figure builders are pure
(DataFrame → Plotly); ``opdviz.views.lab_findings`` computes each sentence the page states from the
same table.

    from opdviz.views.lab import sweep_table, fig_unchanged
    runs = sweep_table(store); fig_unchanged(runs, "exact")
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from opdviz.options import LAB_CRITERIA, criterion_label
from opdviz.store import Store
from opdviz.store.lab import lab_runs
from opdviz.views import figures as F
from opdviz.views import style

CRITERIA = {c: criterion_label(c, "unchanged") for c in LAB_CRITERIA}
METHOD_ORDER = ("OPD", "RL", "SFT")
MOST = 0.5          # "most coordinates unchanged": more than half, bf16-exact
SETTINGS = ("lr", "precision", "weight_decay", "seed", "steps", "batch", "mask", "accuracy", "base_accuracy",
            "test_size", "method_key")
COLUMNS = ("run_id", "method", "status", *SETTINGS, *(f"sparsity_{c}" for c in CRITERIA),
           "sparsity_exact_ffn", "sparsity_exact_attn", "rel_change", "principal_proj_10pct")


# ------------------------------------------------------------------------------------------ data
def sweep_table(store: Store, done_only: bool = True) -> pd.DataFrame:
    """One row per sweep run (see ``COLUMNS``); empty with those columns when the store has none.
    With ``done_only``, runs still computing (or interrupted) are left out: their numbers are partial."""
    runs = runs_from_blocks(lab_runs(store))
    return runs[runs["status"] == "done"].reset_index(drop=True) if done_only else runs


def runs_from_blocks(blocks: pd.DataFrame) -> pd.DataFrame:
    """Fold per-block rows (``opdviz.store.lab.lab_runs``) into one row per run: numel-weighted sparsity over all
    blocks, the FFN and attention bf16-exact sparsity apart, relative change and principal projection
    over all blocks (ΔW-energy-weighted), and the settings parsed from ``extra``."""
    if blocks.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    rows = []
    for run_id, g in blocks.groupby("run_id", sort=False):
        extra = parse_extra(g["extra"].iloc[0])
        row = {"run_id": run_id, "method": g["method"].iloc[0], "status": g["status"].iloc[0]}
        for key in SETTINGS:
            row[key] = extra.get(key)
        for c in CRITERIA:
            row[f"sparsity_{c}"] = _weighted(g[f"sparsity_{c}"], g["numel"])
        for block in ("ffn", "attn"):
            part = g[g["block"] == block]
            row[f"sparsity_exact_{block}"] = _weighted(part["sparsity_exact"], part["numel"])
        dsq, bsq = g["delta_sq"].sum(), g["base_sq"].sum()
        row["rel_change"] = float(np.sqrt(dsq) / np.sqrt(bsq)) if bsq > 0 else np.nan
        has = g["principal_proj_10pct"].notna()
        row["principal_proj_10pct"] = _weighted(g.loc[has, "principal_proj_10pct"], g.loc[has, "delta_sq"])
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["method"] = [_method(r) for r in df.itertuples()]
    for col in ("lr", "weight_decay", "accuracy", "base_accuracy", "test_size"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["mask"] = df["mask"].where(df["mask"].notna(), None)
    return df


def _method(row) -> str:
    key = getattr(row, "method_key", None)
    return {"opd": "OPD", "rl": "RL", "sft": "SFT"}.get(key, str(row.method))


def _weighted(values: pd.Series, weights: pd.Series) -> float:
    ok = values.notna() & weights.notna()
    w = weights[ok].astype(float)
    return float((values[ok].astype(float) * w).sum() / w.sum()) if w.sum() > 0 else np.nan


def parse_extra(text) -> dict:
    """``runs.extra`` (JSON text) as a dict; {} when empty, not JSON or not an object."""
    try:
        value = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def full_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs trained on every coordinate (not the masked retrainings)."""
    return runs[runs["mask"].isna()] if not runs.empty else runs


def seed_stats(runs: pd.DataFrame, value: str, by=("method", "precision", "weight_decay", "lr")) -> pd.DataFrame:
    """Mean, min, max and count of ``value`` over seeds for each setting ``by``."""
    by = list(by)
    if runs.empty:
        return pd.DataFrame(columns=by + ["mean", "min", "max", "n"])
    g = runs.dropna(subset=[value]).groupby(by, dropna=False)[value]
    return g.agg(mean="mean", min="min", max="max", n="count").reset_index()


# ------------------------------------------------------------------------------------------ figures
def _panels(runs: pd.DataFrame) -> list[tuple[str, float]]:
    return sorted({(p, wd) for p, wd in zip(runs["precision"], runs["weight_decay"])}, key=lambda t: (t[0], t[1]))


def _lines_vs_lr(stats: pd.DataFrame, title: str, ylabel: str, scale: float = 100.0,
                 series: str = "method", dash_of=None) -> go.Figure:
    """Mean over seeds against learning rate (log x), min–max over seeds as error bars; one panel per
    (precision, weight decay)."""
    if stats.empty:
        return F.empty_figure("no lab sweep runs in this store: run `opdviz lab sweep`", title)
    panels = _panels(stats)
    fig = style.base_figure(title, rows=1, cols=len(panels), shared_yaxes=True,
                    subplot_titles=[f"{p}, wd {wd:g}" for p, wd in panels])
    names = [m for m in METHOD_ORDER if m in set(stats[series])] + sorted(set(stats[series]) - set(METHOD_ORDER))
    for col, (prec, wd) in enumerate(panels, 1):
        part = stats[(stats["precision"] == prec) & (stats["weight_decay"] == wd)]
        for name in names:
            s = part[part[series] == name].sort_values("lr")
            if s.empty:
                continue
            fig.add_trace(go.Scatter(
                x=s["lr"], y=s["mean"] * scale, mode="lines+markers", name=str(name), legendgroup=str(name),
                showlegend=col == 1, line=dict(color=style.method_color(str(name).split()[0]),
                                               dash=dash_of(name) if dash_of else "solid"),
                error_y=dict(type="data", symmetric=False, array=(s["max"] - s["mean"]) * scale,
                             arrayminus=(s["mean"] - s["min"]) * scale, thickness=1, width=3),
                customdata=s["n"], hovertemplate=f"{name}<br>lr %{{x:.0e}}<br>{ylabel}: %{{y:.1f}}"
                                                  f"<br>seeds: %{{customdata}}<extra></extra>"), row=1, col=col)
    fig.update_xaxes(type="log", title_text="learning rate", exponentformat="power", dtick=1)
    fig.update_yaxes(title_text=ylabel, row=1, col=1)
    fig.update_layout(margin=dict(t=90), height=420)
    return fig


def fig_unchanged(runs: pd.DataFrame, criterion: str = "exact") -> go.Figure:
    """Share of coordinates unchanged under ``criterion`` against learning rate, per method (mean over
    seeds, bars = min–max), one panel per precision and weight decay. Reads ``sweep_table`` columns."""
    stats = seed_stats(full_runs(runs), f"sparsity_{criterion}")
    return _lines_vs_lr(stats, f"Unchanged coordinates ({CRITERIA[criterion]})", "unchanged (%)")


def fig_accuracy(runs: pd.DataFrame) -> go.Figure:
    """Held-out accuracy against learning rate per method (mean over seeds, bars = min–max); dotted:
    the base's accuracy."""
    full = full_runs(runs)
    fig = _lines_vs_lr(seed_stats(full, "accuracy"), "Held-out accuracy", "accuracy (%)")
    if not full.empty and full["base_accuracy"].notna().any():
        base = float(full["base_accuracy"].dropna().iloc[0]) * 100
        lrs = sorted(full["lr"].dropna())
        for col in range(1, len(_panels(full)) + 1):
            F.baseline(fig, [lrs[0], lrs[-1]], [base, base], "base accuracy", row=1, col=col, showlegend=col == 1)
    return fig


def fig_blocks(runs: pd.DataFrame) -> go.Figure:
    """bf16-exact unchanged share of the FFN (solid) and attention (dashed) matrices against learning rate."""
    full = full_runs(runs)
    parts = []
    for block, label in (("ffn", "FFN"), ("attn", "attention")):
        s = seed_stats(full, f"sparsity_exact_{block}")
        s["series"] = s["method"] + " · " + label
        parts.append(s)
    stats = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return _lines_vs_lr(stats, "FFN against attention (bf16-exact unchanged)", "unchanged (%)", series="series",
                        dash_of=lambda name: "dash" if name.endswith("attention") else "solid")


def fig_principal(runs: pd.DataFrame) -> go.Figure:
    """Share of ‖ΔW‖² inside the top-10 % principal subspaces of W_base (joint ‖U_kᵀΔW V_k‖²/‖ΔW‖²),
    energy-weighted over matrices, against learning rate."""
    stats = seed_stats(full_runs(runs), "principal_proj_10pct")
    return _lines_vs_lr(stats, "ΔW energy in the base's top-10 % principal subspaces", "share of ‖ΔW‖² (%)")


def subnetwork_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Accuracy of full OPD, OPD retrained on its changed mask, and on a random mask of the same size per
    tensor, side by side per setting: mean and min–max over seeds, with the mask's density."""
    cols = ["precision", "weight_decay", "lr", "training", "accuracy_mean", "accuracy_min", "accuracy_max",
            "seeds", "mask_density", "unchanged_exact"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    opd = runs[runs["method"] == "OPD"].copy()
    masked_settings = set(zip(opd.loc[opd["mask"].notna(), "precision"], opd.loc[opd["mask"].notna(), "weight_decay"],
                              opd.loc[opd["mask"].notna(), "lr"]))
    opd = opd[[(p, w, lr) in masked_settings for p, w, lr in zip(opd["precision"], opd["weight_decay"], opd["lr"])]]
    if opd.empty:
        return pd.DataFrame(columns=cols)
    opd["training"] = opd["mask"].map({"changed": "OPD mask", "random": "random mask"}).fillna("full OPD")
    g = opd.groupby(["precision", "weight_decay", "lr", "training"])
    out = g["accuracy"].agg(accuracy_mean="mean", accuracy_min="min", accuracy_max="max", seeds="count")
    out["unchanged_exact"] = g["sparsity_exact"].mean()
    out = out.reset_index()
    density = 1 - opd[opd["training"] == "full OPD"].groupby(["precision", "weight_decay", "lr"])["sparsity_exact"].mean()
    out["mask_density"] = [density.get((p, w, lr), np.nan) for p, w, lr in zip(out["precision"], out["weight_decay"], out["lr"])]
    order = {"full OPD": 0, "OPD mask": 1, "random mask": 2}
    out = out.sort_values(["precision", "weight_decay", "lr"], kind="stable")
    out = out.iloc[np.lexsort((out["training"].map(order), out["lr"], out["weight_decay"], out["precision"]))]
    return out[cols].reset_index(drop=True)


def fig_subnetwork(table: pd.DataFrame, base_accuracy: float | None = None) -> go.Figure:
    """Grouped bars from ``subnetwork_table``: accuracy of full / OPD-mask / random-mask training per
    setting, whiskers = min–max over seeds; dotted: the base's accuracy."""
    title = "Subnetwork retraining: full OPD, its mask, a random mask of the same size"
    if table.empty:
        return F.empty_figure("no masked retrainings stored: run `opdviz lab sweep` with --subnetwork", title)
    fig = style.base_figure(title)
    x = [f"{p}, wd {w:g}, lr {lr:.0e}" for p, w, lr in zip(table["precision"], table["weight_decay"], table["lr"])]
    table = table.assign(x=x)
    colors = {"full OPD": style.method_color("OPD"), "OPD mask": style.OKABE_ITO["sky_blue"], "random mask": "#999999"}
    for kind, color in colors.items():
        s = table[table["training"] == kind]
        fig.add_trace(go.Bar(x=s["x"], y=s["accuracy_mean"] * 100, name=kind, marker_color=color,
                             error_y=dict(type="data", symmetric=False, array=(s["accuracy_max"] - s["accuracy_mean"]) * 100,
                                          arrayminus=(s["accuracy_mean"] - s["accuracy_min"]) * 100),
                             customdata=s["seeds"],
                             hovertemplate=f"{kind}<br>%{{x}}<br>accuracy %{{y:.1f}} %<br>seeds: %{{customdata}}"
                                           "<extra></extra>"))
    if base_accuracy is not None and np.isfinite(base_accuracy):
        xs = list(dict.fromkeys(table["x"]))
        F.baseline(fig, xs, [base_accuracy * 100] * len(xs), "base accuracy")
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="accuracy (%)")
    return fig
