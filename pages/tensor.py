"""Tensor page: one matrix up close — where its changed entries lie, its spectrum and angles."""

import dataclasses

import streamlit as st

from opdviz.dashboard import cache, header, params, render

view = header.begin("Tensor", r"""
One weight matrix up close. The **changed-entry map** block-averages the changed mask (share of
entries changed per block, at most 128 × 128 blocks), with the per-row and per-column changed fractions beside it —
bright rows are outlier features. Below: the matrix's $\Delta W$ spectrum, the principal angles between the top-k
singular subspaces of $W_\text{base}$ and $W_\text{post}$, sparsity against the threshold ε, and the update density
per decile of $|W_\text{base}|$ (a left-heavy profile means updates prefer near-zero weights; arXiv 2606.13657,
arXiv 2511.08567). The map shows the first selected run that has it.""")

names = cache.query("tensor_names", view.db, view.stamp, dataclasses.replace(view.sel, leaves_only=False), True)
if not names:
    st.info("No matrices in this selection. Widen the sidebar filters.")
    st.stop()
default = cache.query("largest_tensor", view.db, view.stamp, view.sel) or names[0]
params.sticky("p_tensor", "tensor", names, default)
tensor = st.selectbox("Tensor", names, key="p_tensor",
                      help="Matrices in the sidebar selection (fused tensors and their parts). Default: the "
                           "largest matrix inside a layer.")
params.remember("p_tensor", tensor)
params.sync_params({"tensor": None if tensor == default else tensor})
render.figures(cache.with_ctx(view, tensor=tensor), "tensor")
