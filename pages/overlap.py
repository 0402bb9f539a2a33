"""Overlap page: do two runs that share a base change the same coordinates, beyond chance?"""

import streamlit as st

from opdviz.views import export as figexport
from opdviz.views import registry
from opdviz.views.context import AcrossContext
from opdviz.dashboard import cache, header, params, render, text

view = header.begin("Overlap", r"""For two runs A and B trained from the same base, which coordinates did **both** change? With
$A$, $B$ the changed masks under the sidebar's criterion and densities $p_A = |A|/n$, $p_B = |B|/n$:
**coverage** $|A\cap B|/|A|$ is the share of A's changes that B made too (independence baseline $p_B$), and
symmetrically $|A\cap B|/|B|$ (baseline $p_A$); **Jaccard** $|A\cap B|/|A\cup B|$ has the baseline
$p_Ap_B/(p_A+p_B-p_Ap_B)$ of two independent random masks. Observed ÷ baseline > 1 means the runs pick the same
coordinates more often than chance. Groups sum the counts (numel-weighted). After *Dense Supervision, Sparse
Updates* (arXiv 2606.13657) and *RL Finetunes Small Subnetworks* (arXiv 2505.11711).""")


pairs = cache.across("pairs", view.db, view.stamp, view.sel)
if pairs.empty:
    st.info("No overlap computed for these runs yet. Compute one for two runs that share a base:\n\n"
            f"{text.code(f'opdviz overlap --db {view.db} --base BASE --a POST_A --b POST_B --run-a A --run-b B')}\n\n"
            "(add `--method-a LABEL --method-b LABEL` for runs not analysed with `opdviz compute`), then reload.",
            icon=":material/info:")
    st.stop()

labels = [f"{r.run_a} ∩ {r.run_b}" for r in pairs.itertuples()]
params.sticky("p_pair", "pair", labels, labels[0])
picked = st.selectbox("Pair (A ∩ B)", labels, key="p_pair", help="Pairs with a stored overlap (`opdviz overlap`).")
params.remember("p_pair", picked)
params.sync_params({"pair": None if picked == labels[0] else picked})
row = pairs.iloc[labels.index(picked)]
ctx = AcrossContext(criterion=view.ctx.criterion, run_a=row.run_a, run_b=row.run_b)

for i, spec in enumerate(registry.figures_for("overlap")):
    fig, df = cache.across(spec.key, view.db, view.stamp, view.sel, ctx)
    render.chart(i, spec.key, fig, df, spec.caption, manifest=lambda: render.provenance_manifest(view, ctx))

st.divider()
st.subheader("Tensors that overlap most beyond chance")
top = cache.across("top", view.db, view.stamp, view.sel, ctx)
render.numbers_table(top, {"p_a": "density A", "p_b": "density B", "jaccard_baseline": "Jaccard baseline",
                       "jaccard_ratio": "Jaccard ÷ baseline", "numel": "entries"})
row = st.container(horizontal=True, vertical_alignment="center", gap="small")
row.caption("Data", width="content")
for fmt, label in (("csv", "CSV"), ("parquet", "Parquet")):
    row.download_button(label, data=lambda fmt=fmt: figexport.data_bytes(top, fmt), file_name=f"overlap_top.{fmt}",
                        mime=render.FORMATS[fmt], on_click="ignore", key=f"dl_top_{fmt}", disabled=top.empty)
