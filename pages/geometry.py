"""Geometry page: where updates fall relative to the base weights (principal directions, magnitudes)."""

import streamlit as st

from opdviz.dashboard import cache, header, params, render

view = header.begin("Geometry", r"""
Where the update lands relative to the base weights. **Principal projection**: the share of
$\lVert\Delta W\rVert_F^2$ inside the top-k singular subspaces of $W_\text{base}$, $k = r\cdot\min(m, n)$.
**Principal angles** between the top-k singular subspaces of $W_\text{base}$ and $W_\text{post}$ (float64).
**Coverage**: the share of changed entries that fall in the α·numel lowest-magnitude (or principal) entries of
$W_\text{base}$ — a random mask gives α, so a curve above the diagonal means updates prefer those entries.
Definitions follow *Dense Supervision, Sparse Updates* (arXiv 2606.13657), *The Path Not Taken* (arXiv 2511.08567)
and *On the Geometry of On-Policy Distillation* (arXiv 2606.07082).""")
names = cache.query("tensor_names", view.db, view.stamp, view.sel, True)
params.sticky("p_tensors", "tensors", names, [], multi=True)
picked = st.multiselect("Tensors for the principal-angle plot", names, key="p_tensors", max_selections=12,
                        placeholder="automatic: a middle-layer attention q and FFN down")
params.remember("p_tensors", picked)
params.sync_params({"tensors": picked})
render.figures(cache.with_ctx(view, tensors=tuple(picked)), "geometry")
