"""Builds of the Tensor page: one tensor's changed-entry map, ΔW spectrum, principal angles, threshold sweep
and magnitude-decile profile."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from opdviz.store import queries as Q
from opdviz.views import drilldown as D
from opdviz.views import figures as F
from opdviz.views import figures_spectral as FS
from opdviz.views.context import ViewContext
from opdviz.views.spectra import angles_for, spectra_frame


def tensor_rows(store, sel, ctx) -> tuple[str | None, pd.DataFrame]:
    """The drill-down tensor and the rows of its first selected run that has a changed-entry map."""
    tensor = D.pick_tensor(store, sel, ctx)
    if tensor is None:
        return None, pd.DataFrame()
    a = Q.tensor_arrays(store, sel, (tensor,))
    a = a[a["tensor"] == tensor]
    maps = a[a["name"] == "sparsity_map"]
    return tensor, (a[a["run_id"] == maps["run_id"].iloc[0]] if len(maps) else pd.DataFrame())


def tensor_map(store, sel, ctx):
    tensor, rows_ = tensor_rows(store, sel, ctx)
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


def tensor_spectrum(store, sel, ctx):
    tensor = D.pick_tensor(store, sel, ctx)
    df = spectra_frame(store, replace(sel, leaves_only=False), ViewContext(tensors=(tensor,))) if tensor \
        else pd.DataFrame()
    return FS.spectra(df, f"Singular spectrum of ΔW — {tensor}"), df


def tensor_angles(store, sel, ctx):
    tensor = D.pick_tensor(store, sel, ctx)
    return angles_for(store, replace(sel, leaves_only=False), (tensor,) if tensor else (),
                       f"Principal angles — {tensor}")


def tensor_sweep(store, sel, ctx):
    tensor = D.pick_tensor(store, sel, ctx)
    if tensor is None:
        return F.empty_figure(title="Sparsity against ε"), pd.DataFrame()
    s, e = D.arrays_of(store, sel, "abs_sweep_sparsity", (tensor,)), D.arrays_of(store, sel, "abs_sweep_eps", (tensor,))
    if s.empty or e.empty:
        return F.empty_figure(title=f"Sparsity against ε — {tensor}"), pd.DataFrame()
    rows = [{"run_id": r.run_id, "method": r.method, "eps": eps, "sparsity": v}
            for r in s.itertuples() for eps, v in zip(e["values"].iloc[0], r.values)]
    df = pd.DataFrame(rows)
    mark = float(ctx.criterion.split("_")[1]) if ctx.criterion.startswith("abs_") else None
    return F.sweep(df, f"Sparsity against ε — {tensor}", mark_eps=mark), df


def tensor_deciles(store, sel, ctx):
    tensor = D.pick_tensor(store, sel, ctx)
    df = D.numel_weighted_arrays(store, replace(sel, leaves_only=False), "decile_density", (tensor,)) \
        .rename(columns={"value": "density"}) if tensor else pd.DataFrame()
    if df.empty:
        return F.empty_figure(title="Update density by decile"), df
    df["decile"] = df["i"] + 1
    df["relative"] = df["density"] / df.groupby("run_id")["density"].transform("mean")
    return F.decile_profile(df, f"Update density by decile of |W<sub>base</sub>| — {tensor}"), df
