"""Which tensors a page drills into, and their arrays: the default picks of the Spectra, Geometry and
Tensor pages, labels, and arrays pooled over matrices. Reads go through ``opdviz.store.queries``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from opdviz.store import Selection, Store
from opdviz.store import queries as Q
from opdviz.views.context import ViewContext


def short(row) -> str:
    """'L12 q' for a layer tensor, else its module (embed, lm_head)."""
    layer = row.get("layer")
    return f"L{int(layer)} {row.get('module')}" if layer is not None and not pd.isna(layer) else str(row.get("module"))


def arrays_of(store: Store, sel: Selection, name: str, tensors: tuple[str, ...] = ()) -> pd.DataFrame:
    """Arrays ``name`` of the selected tensors (of only ``tensors`` when given), with tensor fields.

    With ``tensors``, the rows come from ``tensor_arrays`` (every array of those tensors in one query,
    which the other figures of the page share through the store's memo)."""
    if tensors:
        a = Q.tensor_arrays(store, sel, tuple(tensors))
        return a[a["name"] == name].reset_index(drop=True)
    return Q.arrays_long(store, sel, name)


def default_tensors(store: Store, sel: Selection, ctx: ViewContext, per_run: int = 2) -> tuple[str, ...]:
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


def pick_tensor(store: Store, sel: Selection, ctx: ViewContext) -> str | None:
    if ctx.tensor:
        return ctx.tensor
    t = Q.tensors(store, sel)
    t = t[t["rows"].notna() & t["cols"].notna()]
    if t.empty:
        return None
    # the largest matrix inside a layer (the embedding/head are rarely what a drill-down is for)
    t = t.assign(no_layer=t["layer"].isna())
    return str(t.sort_values(["no_layer", "numel", "seq"], ascending=[True, False, True])["tensor"].iloc[0])


def with_label(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["label"] = [short(r) for r in df[["layer", "module"]].to_dict("records")] if len(df) else []
    return df


def explode_values(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """``df`` with each row repeated once per element of its ``values`` array, the element (as float) in
    ``column``: what ``df.assign(column=values).explode(column)`` gives (an empty array keeps one row, NaN),
    without a Python object per element."""
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in df["values"]]
    arrays = [v if v.size else np.array([np.nan]) for v in arrays]
    out = df.iloc[np.repeat(np.arange(len(df)), [v.size for v in arrays])].copy()
    out[column] = np.concatenate(arrays) if arrays else np.array([], dtype=np.float64)
    return out


def numel_weighted_arrays(store, sel, name: str, tensors: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per run: the numel-weighted mean of a fixed-length array over the selected tensors (long form)."""
    a = arrays_of(store, sel, name, tensors)
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
