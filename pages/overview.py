"""Overview page: one row per run, the headline figures, and where every run's numbers came from."""

import streamlit as st

from opdviz.views import export as figexport
from opdviz.views import lab_findings as LF
from opdviz.store import Store
from opdviz.dashboard import cache, header, provenance, render, sidebar

view = header.begin("Overview", r"""
How each post-training run changed the base model's weights, $\Delta W = W_\text{post} - W_\text{base}$.
**Sparsity** is the share of entries left unchanged under the sidebar's criterion (numel-weighted over the selection);
**relative change** is $\lVert\Delta W\rVert_F / \lVert W_\text{base}\rVert_F$; **top-16 energy** is the share of
$\lVert\Delta W\rVert_F^2$ in its 16 largest singular directions; **coverage at α = 10 %** is the share of changed
entries that fall among the 10 % smallest-magnitude (or principal) entries of $W_\text{base}$, against a random
baseline of 10 %. Definitions follow *Dense Supervision, Sparse Updates* (arXiv 2606.13657) and *RL Finetunes Small
Subnetworks* (arXiv 2505.11711).""")

@st.cache_data(show_spinner=False, max_entries=64)
def _sentence(db: str, stamp: tuple) -> str:
    return LF.overview_sentence(Store(db))


if sentence := _sentence(view.db, view.stamp):
    st.info(LF.markdown_escape(sentence), icon=":material/visibility:")

table = cache.query("overview_table", view.db, view.stamp, view.sel, view.ctx)
render.numbers_table(table, {
    "n_tensors": "tensors", "rel_change": "rel. change", f"sparsity_{view.ctx.criterion}": "sparsity",
    "top16_energy": "top-16 energy", "stable_rank": "stable rank", "principal_coverage_10pct": "principal cov. α=10%",
    "principal_enrichment_10pct": "principal enrich. ×", "lowmag_coverage_10pct": "low-mag cov. α=10%",
    "lowmag_enrichment_10pct": "low-mag enrich. ×", "random_baseline_10pct": "random baseline",
    "approx_spectra": "approx. spectra", "base_accuracy": "base acc.", "accuracy_gain": "acc. gain"}, run_id="run")
st.caption(f"Sparsity ({sidebar.criterion_label(view.ctx.criterion)} counts as changed) is parameter-weighted over the selection; relative change is pooled, √ΣΔW²/√ΣW²; top-16 energy "
           "and stable rank are unweighted means over matrices (as on the Spectra page); coverage is pooled by changed "
           "entries, Σ|M∩U|/Σ|U| (the coverage figure's numbers); enrichment = coverage / α (1 = random). "
           "*approx. spectra*: matrices whose spectrum came from the randomized top-k solver (their spectral and "
           "geometry numbers are approximate, ≈). Accuracy comes from the run's training metadata when recorded. "
           "The CSV keeps the stored units (fractions, radians).")
st.download_button("Table as CSV", data=lambda: figexport.data_bytes(table, "csv"), file_name="opdviz_overview.csv",
                   mime="text/csv", on_click="ignore", key="dl_overview_table")

render.figures(view, "overview")

st.divider()
st.subheader("Runs: provenance, skipped and failed tensors")
provenance.run_records(view)
