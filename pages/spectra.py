"""Spectra page: the singular spectrum of each update ΔW and how low-rank it is."""

import streamlit as st

from opdviz.dashboard import cache, header, params, render

view = header.begin("Spectra", r"""
The singular values $\sigma_1 \ge \sigma_2 \ge \dots$ of each update $\Delta W$. **Top-k energy**
$\sum_{i\le k}\sigma_i^2 / \lVert\Delta W\rVert_F^2$ is the share of the update carried by its k strongest
directions; **stable rank** $\lVert\Delta W\rVert_F^2 / \sigma_1^2$ counts how many directions matter. A sparse
update need not be low-rank, so both views are shown. Definitions follow *Dense Supervision, Sparse Updates*
(arXiv 2606.13657) and *On the Geometry of On-Policy Distillation* (arXiv 2606.07082). Spectra from the randomized
top-k solver (large matrices on CPU) are flagged approximate in the data.""")

names = cache.query("tensor_names", view.db, view.stamp, view.sel, True)
params.sticky("p_tensors", "tensors", names, [], multi=True)
picked = st.multiselect("Tensors for the spectrum plots", names, key="p_tensors", max_selections=12,
                        placeholder="automatic: a middle-layer attention q and FFN down",
                        help="Matrices in the sidebar selection; the same name is drawn for every selected run.")
params.remember("p_tensors", picked)
params.sync_params({"tensors": picked})
render.figures(cache.with_ctx(view, tensors=tuple(picked)), "spectra")
