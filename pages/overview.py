"""Overview page: one row per run, the headline figures, and where every run's numbers came from."""

import streamlit as st

from opdviz.views import export as figexport
from opdviz.views import lab_findings as LF
from opdviz.store import Store
from opdviz.dashboard import ui

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
    return LF.overview_sentence(Store(db))


if sentence := _sentence(view.db, view.stamp):
    st.info(LF.markdown_escape(sentence), icon=":material/visibility:")

table = ui.query("overview_table", view.db, view.stamp, view.sel, view.ctx)
ui.numbers_table(table, {
    "n_tensors": "tensors", "rel_change": "rel. change", f"sparsity_{view.ctx.criterion}": "sparsity",
    "top16_energy": "top-16 energy", "stable_rank": "stable rank", "principal_coverage_10pct": "principal cov. α=10%",
    "principal_enrichment_10pct": "principal enrich. ×", "lowmag_coverage_10pct": "low-mag cov. α=10%",
    "lowmag_enrichment_10pct": "low-mag enrich. ×", "random_baseline_10pct": "random baseline",
    "approx_spectra": "approx. spectra", "base_accuracy": "base acc.", "accuracy_gain": "acc. gain"}, run_id="run")
st.caption(f"Sparsity ({ui.criterion_label(view.ctx.criterion)} counts as changed) is parameter-weighted over the selection; relative change is pooled, √ΣΔW²/√ΣW²; top-16 energy "
           "and stable rank are unweighted means over matrices (as on the Spectra page); coverage is pooled by changed "
           "entries, Σ|M∩U|/Σ|U| (the coverage figure's numbers); enrichment = coverage / α (1 = random). "
           "*approx. spectra*: matrices whose spectrum came from the randomized top-k solver (their spectral and "
           "geometry numbers are approximate, ≈). Accuracy comes from the run's training metadata when recorded. "
           "The CSV keeps the stored units (fractions, radians).")
st.download_button("Table as CSV", data=lambda: figexport.data_bytes(table, "csv"), file_name="opdviz_overview.csv",
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
    label = ui.md(f"{run_id} — {prov.get('method')}, {prov.get('status')}, {prov.get('n_done')}/"
                  f"{prov.get('n_tensors')} tensors, {n_skip} skipped, {n_fail} failed")
    with st.expander(label, icon=":material/warning:" if n_fail else ":material/description:"):
        left, right = st.columns(2)
        left.markdown("**Inputs**")
        left.table(ui.md_frame(ui.provenance_rows(prov, ("base_path", "base_fingerprint", "base_bytes", "post_path",
                                                         "post_fingerprint", "post_bytes", "kind", "dtype"))))
        adapter = (prov.get("extra") or {}).get("adapter")
        if isinstance(adapter, dict):     # a PEFT LoRA adapter analysed as its merge into the base
            ranks = sorted({int(r) for r in (adapter.get("ranks") or {}).values() if isinstance(r, (int, float))})
            # adapter_config.json is the checkpoint's text: shown literally (ui.md)
            left.markdown("**LoRA adapter**: " + ui.md(
                f"rank r = {adapter.get('r')}"
                + (f" (per module {ranks[0]}–{ranks[-1]})" if len(ranks) > 1 else "")
                + f", lora_alpha = {adapter.get('lora_alpha')}"
                + (", rsLoRA (scale α/√r)" if adapter.get("use_rslora") else " (scale α/r)")
                + f", {adapter.get('n_lora_modules')} LoRA modules"
                + (f", modules_to_save {adapter.get('modules_to_save')}" if adapter.get("modules_to_save") else "")))
        right.markdown("**Job**")
        right.table(ui.md_frame(ui.provenance_rows(prov, ("device", "seed", "status", "error", "created_at",
                                                          "finished_at", "wall_s", "n_tensors", "n_done", "n_skipped",
                                                          "n_failed"))))
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
