"""Compare page: one metric across runs, per module and per layer, and run B − run A."""

import streamlit as st

from opdviz.dashboard import cache, header, params, render, sidebar

view = header.begin("Compare", r"""
One metric side by side across the selected runs — per module, per layer, and as the difference
B − A per layer and module (diverging colours centred on 0). Shares (sparsity, energy share, coverage, top-k
energy) are in %. Each group pools the metric by its own rule from the metric catalog, and the axis says which:
sparsity is parameter-weighted, coverage weighted by the changed entries, relative change pooled from the sums,
per-matrix metrics (stable rank, NSS, angles…) the mean over the group's matrices. A difference is only meaningful between runs that share a base: check
the base fingerprints on the Overview page. Metrics as in *Dense Supervision, Sparse Updates* (arXiv 2606.13657).""")

metrics = sidebar.compare_metrics(cache.query("metric_names", view.db, view.stamp, view.sel.runs))
runs = cache.query("runs", view.db, view.stamp)
run_ids = [r for r in runs["run_id"] if not view.sel.runs or r in view.sel.runs]
label = sidebar.run_label(runs)

c_metric, c_a, c_b = st.columns([2, 1, 1])
params.sticky("p_metric", "metric", metrics, "sparsity")
metric = c_metric.selectbox("Metric", metrics, key="p_metric")
params.sticky("p_a", "a", run_ids, run_ids[0] if run_ids else None)
run_a = c_a.selectbox("Run A", run_ids, key="p_a", format_func=label)
others = [r for r in run_ids if r != run_a] or run_ids
params.sticky("p_b", "b", others, others[0] if others else None)
run_b = c_b.selectbox("Run B", others, key="p_b", format_func=label)
for key, value in (("p_metric", metric), ("p_a", run_a), ("p_b", run_b)):
    params.remember(key, value)
params.sync_params({"metric": None if metric == "sparsity" else metric, "a": run_a, "b": run_b})
render.figures(cache.with_ctx(view, metric=metric, run_a=run_a, run_b=run_b), "compare")
