"""The lab page's data, figures and findings: when does the update become sparse?

``sweep_table`` turns ``opdviz.store.lab.lab_runs`` (one row per sweep run and block) into one row per run with
its settings (from ``runs.extra``) and whole-model numbers; the figure builders are pure
(DataFrame → Plotly) and the ``finding_*`` functions compute each sentence the page states from the
same table, so no finding is typed by hand. A finding says "does not reproduce" when the data says so.

    from opdviz.views.lab import sweep_table, fig_unchanged, finding_sparse_regime
    runs = sweep_table(store); fig_unchanged(runs, "exact"); finding_sparse_regime(runs)
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from opdviz.views import figures as F
from opdviz.store import queries as Q
from opdviz.store import summary as S
from opdviz.store.lab import lab_runs
from opdviz.store.selection import Selection
from opdviz.store import Store

CRITERIA = {"exact": "bf16-exact (bits equal)", "abs_1e-6": "|ΔW| ≤ 1e-6", "abs_1e-5": "|ΔW| ≤ 1e-5",
            "abs_1e-4": "|ΔW| ≤ 1e-4", "bf16_1e-3": "|ΔW| ≤ 1e-3·max|W|"}
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
        extra = _json(g["extra"].iloc[0])
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


def _json(text) -> dict:
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
    fig = F._figure(title, rows=1, cols=len(panels), shared_yaxes=True,
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
                showlegend=col == 1, line=dict(color=F.method_color(str(name).split()[0]),
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
            F._baseline(fig, [lrs[0], lrs[-1]], [base, base], "base accuracy", row=1, col=col, showlegend=col == 1)
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
    fig = F._figure(title)
    x = [f"{p}, wd {w:g}, lr {lr:.0e}" for p, w, lr in zip(table["precision"], table["weight_decay"], table["lr"])]
    table = table.assign(x=x)
    colors = {"full OPD": F.method_color("OPD"), "OPD mask": F.OKABE_ITO["sky_blue"], "random mask": "#999999"}
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
        F._baseline(fig, xs, [base_accuracy * 100] * len(xs), "base accuracy")
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="accuracy (%)")
    return fig


# ------------------------------------------------------------------------------------------ findings
def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _lr(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def gain_threshold(base: float, n_test: float) -> float:
    """The accuracy a run must exceed to count as improved: the base plus two binomial standard errors of
    an ``n_test``-problem test (a smaller gain is within the test set's sampling noise)."""
    n = n_test if n_test and np.isfinite(n_test) and n_test > 0 else 500.0
    return base + 2 * np.sqrt(max(base * (1 - base), 1e-12) / n)


def finding_sparse_regime(runs: pd.DataFrame) -> str:
    """Where (method, precision, rate) most coordinates stay bit-identical (mean over seeds > 50 %) while
    every seed's accuracy beats the base by more than two standard errors of the test set."""
    full = full_runs(runs)
    if full.empty:
        return "No lab sweep runs are stored yet."
    keys = ["method", "precision", "weight_decay", "lr"]
    m = seed_stats(full, "accuracy", by=keys).merge(seed_stats(full, "sparsity_exact", by=keys), on=keys,
                                                    suffixes=("_acc", "_sp"))
    if m.empty or not full["base_accuracy"].notna().any():
        return "The stored sweep runs lack accuracy or sparsity, so the sparse regime cannot be located."
    base = float(full["base_accuracy"].dropna().iloc[0])
    bar = gain_threshold(base, float(full["test_size"].dropna().iloc[0]) if full["test_size"].notna().any() else 500)
    hit = m[(m["mean_sp"] > MOST) & (m["min_acc"] > bar)]
    if hit.empty:
        best = m.sort_values("mean_sp", ascending=False).iloc[0]
        return (f"No setting of the sweep leaves most coordinates bit-identical while every seed improves on the "
                f"base ({_pct(base)}, improvement = above {_pct(bar)}): the sparsest, {best['method']} at lr "
                f"{_lr(best['lr'])} ({best['precision']}), leaves {_pct(best['mean_sp'])} unchanged at "
                f"{_pct(best['mean_acc'])} accuracy.")
    parts = [f"{r.method} at lr {_lr(r.lr)} ({r.precision}, wd {r.weight_decay:g}): {_pct(r.mean_sp)} unchanged, "
             f"accuracy {_pct(r.mean_acc)}" for r in hit.sort_values(["precision", "lr", "method"]).itertuples()]
    return (f"The update is sparse (most coordinates bit-identical) while every seed improves on the base's "
            f"{_pct(base)} accuracy (beyond two standard errors, {_pct(bar)}) in {len(hit)} of {len(m)} settings — "
            + "; ".join(parts[:6]) + ("; …" if len(parts) > 6 else "") + ".")


def finding_precision(runs: pd.DataFrame) -> str:
    """fp32 master weights against bf16 throughout, at equal method, rate, decay and seed."""
    full = full_runs(runs)
    keys = ["method", "lr", "weight_decay", "seed"]
    if full.empty or set(full["precision"]) != {"fp32", "bf16"}:
        return "The sweep has not run both precisions yet, so their effect on sparsity is not measured."
    a = full[full["precision"] == "fp32"].set_index(keys)["sparsity_exact"]
    b = full[full["precision"] == "bf16"].set_index(keys)["sparsity_exact"]
    both = a.to_frame("fp32").join(b.to_frame("bf16"), how="inner").dropna()
    if both.empty:
        return "No pair of runs differs only in precision yet."
    more = int((both["bf16"] > both["fp32"]).sum())
    verdict = ("rounding each step's update to bf16 is what makes the update sparse here" if more > len(both) / 2
               else "keeping the weights in bf16 does not make the update sparser here")
    return (f"Keeping the weights in bf16 throughout leaves {_pct(both['bf16'].mean())} of coordinates bit-identical "
            f"on average, against {_pct(both['fp32'].mean())} with fp32 master weights rounded to bf16 at the end "
            f"(bf16 is sparser in {more} of {len(both)} matched runs): {verdict}.")


def _spread_compare(stats_a: pd.DataFrame, stats_b: pd.DataFrame, keys: list[str]) -> tuple[int, int, int]:
    """Settings where a's seed range lies above b's, below it, and all settings compared (only settings
    with at least two seeds on both sides: one seed has no range to compare against)."""
    m = stats_a.merge(stats_b, on=keys, suffixes=("_a", "_b"))
    m = m[(m["n_a"] >= 2) & (m["n_b"] >= 2)]
    return int((m["min_a"] > m["max_b"]).sum()), int((m["max_a"] < m["min_b"]).sum()), len(m)


def finding_methods(runs: pd.DataFrame) -> str:
    """The paper's claim that OPD and RL leave more coordinates unchanged than SFT, tested per setting with
    the seed ranges: a difference counts only when the ranges do not overlap."""
    full = full_runs(runs)
    keys = ["precision", "weight_decay", "lr"]
    if full.empty or "SFT" not in set(full["method"]):
        return "The sweep has no SFT runs, so the claim that OPD and RL are sparser than SFT is not tested."
    sft = seed_stats(full[full["method"] == "SFT"], "sparsity_exact", by=keys)
    out = []
    for method in ("OPD", "RL"):
        if method not in set(full["method"]):
            continue
        above, below, n = _spread_compare(seed_stats(full[full["method"] == method], "sparsity_exact", by=keys), sft, keys)
        if n == 0:
            continue
        verdict = "reproduces" if above > n / 2 else "does not reproduce"
        out.append(f"{method} sparser than SFT beyond the seed range in {above} of {n} settings "
                   f"(denser in {below}): the claim {verdict} for {method}")
    if not out:
        return ("The claim that OPD and RL leave more coordinates unchanged than SFT needs settings with at least two "
                "seeds of SFT and of OPD or RL; none are stored yet.")
    return "Paper claim 'OPD and RL leave more coordinates unchanged than SFT': " + "; ".join(out) + "."


def finding_blocks(runs: pd.DataFrame) -> str:
    """The paper's observation that updates favour the FFN: more of the FFN's coordinates change than of
    attention's (bf16-exact), counted over runs where either moved at all."""
    full = full_runs(runs).dropna(subset=["sparsity_exact_ffn", "sparsity_exact_attn"])
    full = full[(full["sparsity_exact_ffn"] < 1) | (full["sparsity_exact_attn"] < 1)]
    if full.empty:
        return "No run changed its FFN or attention weights yet."
    ffn_more = int((full["sparsity_exact_ffn"] < full["sparsity_exact_attn"]).sum())
    verdict = "reproduces" if ffn_more > len(full) / 2 else "does not reproduce"
    return (f"Paper claim 'the update favours the FFN': in {ffn_more} of {len(full)} runs a larger share of FFN "
            f"coordinates changed than of attention coordinates (mean unchanged: FFN "
            f"{_pct(full['sparsity_exact_ffn'].mean())}, attention {_pct(full['sparsity_exact_attn'].mean())}); "
            f"the claim {verdict} here.")


def finding_principal(runs: pd.DataFrame) -> str:
    """OPD/RL against SFT on the share of ‖ΔW‖² inside the base's top-10 % principal subspaces (the paper:
    on-policy updates avoid the principal directions more than SFT does), over runs matched on precision,
    weight decay, rate and seed."""
    full = full_runs(runs).dropna(subset=["principal_proj_10pct"])
    keys = ["precision", "weight_decay", "lr", "seed"]
    sft = full[full["method"] == "SFT"].set_index(keys)["principal_proj_10pct"]
    parts, verdicts = [], []
    for method in ("OPD", "RL"):
        mine = full[full["method"] == method].set_index(keys)["principal_proj_10pct"]
        both = mine.to_frame("a").join(sft.to_frame("sft"), how="inner")
        if both.empty:
            continue
        below = int((both["a"] < both["sft"]).sum())
        parts.append(f"{method} puts less of its update there than SFT in {below} of {len(both)} matched runs "
                     f"(means {100 * both['a'].mean():.1f} % against {100 * both['sft'].mean():.1f} %)")
        verdicts.append(below > len(both) / 2)
    if not parts:
        return "The sweep needs SFT and OPD or RL runs with the same settings to compare their principal-subspace overlap."
    verdict = "reproduces" if all(verdicts) else "does not reproduce"
    return ("Share of ‖ΔW‖² inside the base's top-10 % principal subspaces: " + "; ".join(parts)
            + f". Paper claim 'on-policy updates stay further from the principal subspaces than SFT': {verdict} here.")


def finding_subnetwork(table: pd.DataFrame) -> str:
    """The paper's subnetwork test: retraining on only the coordinates full OPD changed recovers full OPD's
    accuracy, and a random mask of the same size does not. Counted per setting with seed ranges."""
    if table.empty:
        return "No masked retrainings are stored yet, so the subnetwork claim is not tested."
    piv = table.pivot_table(index=["precision", "weight_decay", "lr"], columns="training",
                            values=["accuracy_mean", "accuracy_min", "accuracy_max"])
    need = {"full OPD", "OPD mask", "random mask"}
    if not need <= set(piv.columns.get_level_values(1)):
        return "Masked and random-mask retrainings are not both stored yet."
    piv = piv.dropna()
    if piv.empty:
        return "No setting has full, masked and random-mask OPD runs all stored yet."
    density = table.groupby(["precision", "weight_decay", "lr"])["mask_density"].first()
    holds, parts = 0, []
    for (p, wd, lr), r in piv.iterrows():
        mask_ok = r[("accuracy_max", "OPD mask")] >= r[("accuracy_min", "full OPD")]
        random_worse = r[("accuracy_max", "random mask")] < r[("accuracy_min", "OPD mask")]
        ok = bool(mask_ok and random_worse)
        holds += ok
        parts.append(f"{p}, lr {_lr(lr)}, mask {_pct(density.get((p, wd, lr), np.nan))} of coordinates: full "
                     f"{_pct(r[('accuracy_mean', 'full OPD')])}, OPD mask {_pct(r[('accuracy_mean', 'OPD mask')])}, "
                     f"random mask {_pct(r[('accuracy_mean', 'random mask')])} — {'holds' if ok else 'fails'}")
    return (f"Subnetwork claim (retraining only the coordinates full OPD changed matches full OPD, and a random mask "
            f"of the same size per tensor falls below it, beyond the seed range): holds in {holds} of {len(piv)} "
            f"settings (" + "; ".join(parts[:4]) + ("; …" if len(parts) > 4 else "") + ").")


def markdown_escape(text: str) -> str:
    """``text`` with Markdown's special characters backslash-escaped, for ``st.markdown`` of sentences that
    quote run names and labels from the store (untrusted)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>$~])", r"\\\1", text)


def _range_pct(values) -> str:
    lo, hi = min(values), max(values)
    return _pct(lo) if round(100 * lo) == round(100 * hi) else f"{100 * lo:.0f}–{100 * hi:.0f} %"


def overview_sentence(store: Store) -> str:
    """One sentence for the Overview, computed from the store: the post-trained runs grouped by their training
    settings (from ``runs.extra``: lr, precision, weight decay), each group's share of bit-identical
    coordinates and accuracy before → after; runs still computing are left out (their numbers are partial).
    Empty when no finished run is stored."""
    runs = Q.runs(store)
    if runs.empty:
        return ""
    summary = S.run_summary(store, Selection(), criterion="exact", matrix_metrics=())
    if summary.empty:
        return ""
    spars = dict(zip(summary["run_id"], summary["sparsity"]))
    groups: dict[str, list] = {}
    done = runs[(runs["kind"] == "pair") & (runs["status"] == "done") & runs["run_id"].isin(list(spars))]
    for r in done.itertuples():
        e = _json(r.extra)
        if e.get("mask"):
            continue
        if e.get("lr") is not None:
            prec = e.get("precision") or "fp32"
            how = "weights in bf16 throughout" if prec == "bf16" else "fp32 master weights saved as bf16"
            wd = e.get("weight_decay")
            key = f"at lr {_lr(float(e['lr']))} with {how}" + (
                "" if wd is None else (", no weight decay" if float(wd) == 0 else f", weight decay {float(wd):g}"))
        else:
            key = "with no recorded training settings"
        acc = (float(e["base_accuracy"]), float(e["accuracy"])) if e.get("accuracy") is not None and \
            e.get("base_accuracy") is not None else None
        groups.setdefault(key, []).append((r.run_id, spars[r.run_id], acc))
    if not groups:
        return ""
    parts = []
    for key, items in groups.items():
        names = ", ".join(n for n, _, _ in items[:4]) + (", …" if len(items) > 4 else "")
        text = f"{key} ({names}) {_range_pct([s for _, s, _ in items])} of coordinates stay bit-identical"
        accs = [a for _, _, a in items if a is not None]
        if accs:
            text += (f" and held-out accuracy goes from {_range_pct([a[0] for a in accs])} to "
                     f"{_range_pct([a[1] for a in accs])}")
        parts.append(text)
    n = sum(len(v) for v in groups.values())
    return (f"You are looking at {n} post-trained run{'s' if n != 1 else ''} compared with their base: "
            + "; ".join(parts[:4]) + (f"; and {len(parts) - 4} more settings" if len(parts) > 4 else "") + ".")
