"""The lab page's findings: each sentence the Lab and Overview pages state, computed from the sweep table
(``opdviz.views.lab.sweep_table``) or the store, so no finding is typed by hand. A finding says "does not
reproduce" when the data says so.

    from opdviz.views.lab import sweep_table
    from opdviz.views.lab_findings import finding_sparse_regime
    finding_sparse_regime(sweep_table(store))
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from opdviz.store import Selection, Store
from opdviz.store import queries as Q
from opdviz.store import summary as S
from opdviz.views.lab import MOST, full_runs, parse_extra, seed_stats


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
        e = parse_extra(r.extra)
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
