"""Tables beside the figures: the Overview's one row per run, a run's provenance, and which runs have
approximate spectra."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd

from opdviz.store import Selection, Store
from opdviz.store import queries as Q
from opdviz.store import summary as S
from opdviz.views import formatting
from opdviz.views.context import ViewContext
from opdviz.views.sparsity import coverage_frame


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
    cov = coverage_frame(store, sel, ctx)
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
    extra = {r: formatting.json_dict(runs.at[r, "extra"]) for r in s["run_id"] if r in runs.index}
    for key in ("accuracy", "base_accuracy"):
        s[key] = [_num(extra.get(r, {}).get(key)) for r in s["run_id"]]
    s["accuracy_gain"] = s["accuracy"] - s["base_accuracy"]
    return s[cols].reset_index(drop=True)


def provenance(store: Store, run_id: str) -> dict:
    """Where a run's results came from: paths, fingerprints, sizes, options, versions, device, dtype, seed,
    status, times and tensor counts. Empty dict when the run is unknown."""
    row = store.run_row(run_id)
    return {} if row is None else _provenance(row)


def provenances(store: Store) -> dict[str, dict]:
    """``provenance`` of every run, keyed by run id, from one query (a sweep's Overview and export
    manifests read them all)."""
    return {run_id: _provenance(row) for run_id, row in store.run_rows().items()}


def _provenance(row: dict) -> dict:
    out = {k: _plain(row.get(k)) for k in (
        "run_id", "method", "kind", "base_path", "post_path", "base_fingerprint", "post_fingerprint", "base_bytes",
        "post_bytes", "device", "dtype", "seed", "status", "error", "created_at", "finished_at", "wall_s",
        "n_tensors", "n_done", "n_skipped", "n_failed", "bytes_total", "bytes_done")}
    out["options"] = formatting.json_dict(row.get("options"))
    out["versions"] = formatting.json_dict(row.get("versions"))
    out["extra"] = formatting.json_dict(row.get("extra"))
    return out


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
