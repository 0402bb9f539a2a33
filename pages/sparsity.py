"""Sparsity page: which coordinates a run changed, by layer and module, and how that depends on ε."""

from opdviz.dashboard import header, render

view = header.begin("Sparsity", r"""
**Sparsity** is the share of a matrix's entries that post-training left unchanged, unchanged / numel,
where an entry of $\Delta W = W_\text{post} - W_\text{base}$ counts as *changed* under the criterion chosen in the
sidebar: bitwise (exact), $|\Delta W| > \varepsilon$, $|\Delta W| > \tau\cdot\mathrm{RMS}(W_\text{base})$, or the
bf16-aware $|\Delta W| > \eta\cdot\max(|W_\text{base}|, |W_\text{post}|)$. Groups (layers, modules) are
numel-weighted. Criteria and thresholds follow *RL Finetunes Small Subnetworks* (arXiv 2505.11711), *Dense
Supervision, Sparse Updates* (arXiv 2606.13657) and *The Path Not Taken* (arXiv 2511.08567, bf16-η).""")
render.figures(view, "sparsity")
