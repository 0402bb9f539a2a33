"""Lab page: when does the update become sparse? The `opdviz lab sweep` runs against learning rate."""

import streamlit as st

from opdviz.views import lab as VL
from opdviz.views import lab_findings as LF
from opdviz.store import Store
from opdviz.dashboard import header, render

view = header.begin("Lab: when is the update sparse?", r"""
The lab post-trains one tiny Llama base (2-digit addition) with **OPD**, **RL** (GRPO) and **SFT** over a grid of
learning rates, two ways of keeping the weights — **fp32** master weights rounded to bf16 once at the end, or
**bf16** throughout (every step's update is rounded to bf16) — weight decay and seeds (`opdviz lab sweep`).
Each point is the mean over seeds; bars span the lowest to the highest seed. **Unchanged** is the share of
coordinates of $W_\text{post}$ equal to $W_\text{base}$ (bf16-exact: the stored bits; or $|\Delta W| \le \varepsilon$),
numel-weighted over all tensors. The sentences below are computed from the stored runs.""")


@st.cache_data(show_spinner=False, max_entries=64)
def _runs(db: str, stamp: tuple):
    return VL.sweep_table(Store(db))


runs = _runs(view.db, view.stamp)
if runs.empty:
    st.info("No lab sweep runs in this database yet. Train and analyse them with\n\n"
            f"`opdviz lab sweep --db {view.db}`\n\n(a small grid first: `opdviz lab sweep --db {view.db} --lrs "
            "1e-5,1e-4 --seeds 0 --precisions bf16 --weight-decay 0`), then reload.", icon=":material/info:")
    st.stop()

n_full = int(runs["mask"].isna().sum())
st.caption(f"{n_full} sweep runs and {len(runs) - n_full} masked retrainings stored; learning rates "
           + ", ".join(f"{x:g}" for x in sorted(runs['lr'].dropna().unique())) + "; seeds "
           + ", ".join(str(s) for s in sorted(runs['seed'].dropna().unique())) + ".")

st.subheader("Findings")
sub = VL.subnetwork_table(runs)
for sentence in (LF.finding_sparse_regime(runs), LF.finding_precision(runs), LF.finding_methods(runs),
                 LF.finding_blocks(runs), LF.finding_principal(runs), LF.finding_subnetwork(sub)):
    st.markdown(f"- {LF.markdown_escape(sentence)}")

criteria = list(VL.CRITERIA)
criterion = st.selectbox("Unchanged under", criteria, format_func=lambda c: VL.CRITERIA[c], key="p_lab_crit")

PLOT = render.PLOTLY_CONFIG
left, right = st.columns(2)
left.plotly_chart(VL.fig_unchanged(runs, criterion), width="stretch", theme=None, key="fig_lab_unchanged", config=PLOT)
right.plotly_chart(VL.fig_accuracy(runs), width="stretch", theme=None, key="fig_lab_accuracy", config=PLOT)
st.caption("Left: share of coordinates unchanged against learning rate; right: exact-match accuracy on the held-out "
           "problems (dotted: the base). Same runs, same colours; one panel per precision and weight decay.")
left, right = st.columns(2)
left.plotly_chart(VL.fig_blocks(runs), width="stretch", theme=None, key="fig_lab_blocks", config=PLOT)
right.plotly_chart(VL.fig_principal(runs), width="stretch", theme=None, key="fig_lab_principal", config=PLOT)
st.caption("Left: bf16-exact unchanged share of the FFN matrices (solid) and the attention matrices (dashed). Right: "
           "share of ‖ΔW‖² inside the top-10 % singular subspaces of W_base (joint projection ‖U_kᵀΔW V_k‖²/‖ΔW‖², "
           "weighted by each matrix's ‖ΔW‖²); an isotropic random update puts about r² = 1 % there for a square "
           "matrix (k²/mn for m×n).")

st.subheader("Subnetwork: retraining on the coordinates OPD changed")
base_acc = runs["base_accuracy"].dropna()
st.plotly_chart(VL.fig_subnetwork(sub, float(base_acc.iloc[0]) if len(base_acc) else None), width="stretch",
                theme=None, key="fig_lab_subnetwork", config=PLOT)
st.caption("As 2606.13657 and 2505.11711 test it: OPD retrained from the base with gradients masked to the coordinates "
           "full OPD changed (bf16 bits differ) and frozen coordinates restored after each step; the control is a random "
           "mask with the same count per tensor. Bars: mean over seeds, whiskers: min–max.")
LR = {"lr": st.column_config.NumberColumn("lr", format="%.0e")}
st.dataframe(render.percent(sub, ("accuracy_", "mask_density", "unchanged_exact")), hide_index=True, width="stretch",
             column_config={**LR, **{c: st.column_config.NumberColumn(format="%.1f %%") for c in
                                     ("accuracy_mean", "accuracy_min", "accuracy_max", "mask_density", "unchanged_exact")}})

with st.expander("Every sweep run"):
    st.dataframe(runs, hide_index=True, width="stretch", column_config=LR)
    st.download_button("Sweep runs as CSV", data=lambda: runs.to_csv(index=False).encode(), file_name="opdviz_lab_sweep.csv",
                       mime="text/csv", on_click="ignore", key="dl_lab_runs")
