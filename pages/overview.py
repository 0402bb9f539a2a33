"""Overview page: one row per run, the headline figures, and where every run's numbers came from."""

import streamlit as st

from opdviz import views_lab
from opdviz.store import Store
from pages import ui

PERCENT = ("sparsity_", "top16_energy", "principal_coverage", "lowmag_coverage", "random_baseline")

view = ui.begin("Overview", r"""
How each post-training run changed the base model's weights, $\Delta W = W_\text{post} - W_\text{base}$.
**Sparsity** is the share of entries left unchanged under the sidebar's criterion (numel-weighted over the selection);
**relative change** is $\lVert\Delta W\rVert_F / \lVert W_\text{base}\rVert_F$; **top-16 energy** is the share of
$\lVert\Delta W\rVert_F^2$ in its 16 largest singular directions; **coverage at α = 10 %** is the share of changed
entries that fall among the 10 % smallest-magnitude (or principal) entries of $W_\text{base}$, against a random
baseline of 10 %. Definitions follow *Dense Supervision, Sparse Updates* (arXiv 2606.13657) and *RL Finetunes Small
Subnetworks* (arXiv 2505.11711).""")



@st.cache_data(show_spinner=False, max_entries=64)
def _sentence(db: str, stamp: tuple) -> str:
    return views_lab.overview_sentence(Store(db))


if sentence := _sentence(view.db, view.stamp):
    st.info(views_lab.markdown_escape(sentence), icon=":material/visibility:")

table = ui.query("overview_table", view.db, view.stamp, view.sel, view.ctx)
st.dataframe(ui.percent(table, PERCENT), hide_index=True, width="stretch", column_config={
    "run_id": "run", "n_tensors": st.column_config.NumberColumn("tensors"),
    "rel_change": st.column_config.NumberColumn("rel. change", format="%.2e"),
    f"sparsity_{view.ctx.criterion}": st.column_config.NumberColumn(
        f"sparsity ({ui.criterion_label(view.ctx.criterion)})", format="%.1f %%"),
    "top16_energy": st.column_config.NumberColumn("top-16 energy", format="%.1f %%"),
    "stable_rank": st.column_config.NumberColumn("stable rank", format="%.1f"),
    "principal_coverage_10pct": st.column_config.NumberColumn("principal cov. α=10%", format="%.1f %%"),
    "principal_enrichment_10pct": st.column_config.NumberColumn("principal enrich.", format="%.2f×"),
    "lowmag_coverage_10pct": st.column_config.NumberColumn("low-mag cov. α=10%", format="%.1f %%"),
    "lowmag_enrichment_10pct": st.column_config.NumberColumn("low-mag enrich.", format="%.2f×"),
    "random_baseline_10pct": st.column_config.NumberColumn("random baseline", format="%.0f %%"),
    "accuracy": st.column_config.NumberColumn(format="%.3f"),
    "base_accuracy": st.column_config.NumberColumn("base acc.", format="%.3f"),
    "accuracy_gain": st.column_config.NumberColumn("acc. gain", format="%+.3f")})
st.caption("Shares in %; enrichment = coverage / α (1× = random). Accuracy comes from the run's training metadata "
           "when it was recorded.")
st.download_button("Table as CSV", data=lambda: table.to_csv(index=False).encode(), file_name="opdviz_overview.csv",
                   mime="text/csv", on_click="ignore", key="dl_overview_table")

ui.figures(view, "overview")

st.divider()
st.subheader("Runs: provenance, skipped and failed tensors")
runs = ui.query("runs", view.db, view.stamp)
shown_runs = runs[runs["run_id"].isin(view.sel.runs)] if view.sel.runs else runs
for run_id in shown_runs["run_id"]:
    prov = ui.query("provenance", view.db, view.stamp, run_id)
    bad = ui.query("not_ok", view.db, view.stamp, run_id)
    n_skip, n_fail = int((bad["status"] == "skipped").sum()), int((bad["status"] == "failed").sum())
    label = (f"{run_id} — {prov.get('method')}, {prov.get('status')}, {prov.get('n_done')}/{prov.get('n_tensors')} "
             f"tensors, {n_skip} skipped, {n_fail} failed")
    with st.expander(label, icon=":material/warning:" if n_fail else ":material/description:"):
        left, right = st.columns(2)
        left.markdown("**Inputs**")
        left.table(ui.provenance_rows(prov, ("base_path", "base_fingerprint", "base_bytes", "post_path",
                                             "post_fingerprint", "post_bytes", "kind", "dtype")))
        right.markdown("**Job**")
        right.table(ui.provenance_rows(prov, ("device", "seed", "status", "error", "created_at", "finished_at",
                                              "wall_s", "n_tensors", "n_done", "n_skipped", "n_failed")))
        c1, c2, c3 = st.columns(3)
        c1.markdown("**Options**")
        c1.json(prov.get("options") or {}, expanded=False)
        c2.markdown("**Package versions**")
        c2.json(prov.get("versions") or {}, expanded=False)
        c3.markdown("**Training metadata**")
        c3.json(prov.get("extra") or {}, expanded=False)
        if bad.empty:
            st.caption("Every tensor was analysed.")
        else:
            st.markdown("**Tensors not analysed** (skipped: not comparable; failed: an error in one stage)")
            st.dataframe(bad, hide_index=True, width="stretch")
