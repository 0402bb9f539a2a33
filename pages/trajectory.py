"""Trajectory page: how the update of one training run builds up, checkpoint by checkpoint."""

import streamlit as st

from opdviz import views_across as VA
from opdviz.store import Store
from pages import ui

view = ui.begin("Trajectory", r"""Checkpoints of one run at steps $t$, each compared with the base: $\Delta_t = W_t -
W_\text{base}$. **Per-pair metrics** of every step run against the step; **consecutive sparsity**, the share of
entries unchanged between checkpoints $t-1$ and $t$; **updates outside the final mask**, the entries changed at $t$
that the final checkpoint leaves unchanged; **subspace locking** $\mathrm{Sim}_K(t) = \tfrac1K\lVert V_K(t)^\top
V_K(T)\rVert_F^2$ with $V_K$ the top-$K$ right singular vectors of $\Delta_t$ (*On the Geometry of On-Policy
Distillation*, arXiv 2606.07082); and the Hill estimate of the heavy-tail exponent of the spectrum of $\Delta_t$.""")


@st.cache_data(show_spinner=False, max_entries=256)
def _q(name: str, db: str, stamp: tuple, *args):
    store = Store(db)
    if name == "trajectories":
        return VA.trajectories(store)
    return VA.figure_spec(name).build(store, *args)


trajs = _q("trajectories", view.db, view.stamp)
if trajs.empty:
    st.info("No trajectory in this database yet. Analyse the checkpoints of one run, step by step:\n\n"
            f"`opdviz trajectory --db {view.db} BASE RUN_FOLDER --name NAME --method LABEL`\n\n"
            "(RUN_FOLDER holds `checkpoint-100/`, `checkpoint-200/`, …; or list checkpoints with `--steps`), "
            "then reload.", icon=":material/info:")
    st.stop()

names = list(trajs["trajectory"])
c_t, c_m = st.columns([1, 1])
ui.sticky("p_traj", "traj", names, names[0])
name = c_t.selectbox("Trajectory", names, key="p_traj",
                     format_func=lambda n: f"{n} ({trajs.set_index('trajectory').at[n, 'method']}, "
                                           f"{trajs.set_index('trajectory').at[n, 'n_steps']} steps)")
metrics = list(VA.STEP_METRICS)
ui.sticky("p_tmetric", "tmetric", metrics, "sparsity")
metric = c_m.selectbox("Per-step metric", metrics, key="p_tmetric", format_func=lambda m: VA.STEP_METRICS[m])
for key, value in (("p_traj", name), ("p_tmetric", metric)):
    ui.remember(key, value)
ui.sync_params({"traj": None if name == names[0] else name, "tmetric": None if metric == "sparsity" else metric})
if not bool(trajs.set_index("trajectory").at[name, "has_metrics"]):
    st.warning(f"Trajectory **{name}** has per-step runs but no trajectory metrics yet (is `opdviz trajectory` "
               "still running?). Per-step figures are shown; rerun the same command to finish.")
ctx = VA.AcrossContext(criterion=view.ctx.criterion, trajectory=name, metric=metric)

for i, spec in enumerate(VA.figures_for("trajectory")):
    fig, df = _q(spec.key, view.db, view.stamp, view.sel, ctx)
    if i:
        st.divider()
    st.plotly_chart(fig, width="stretch", theme=None, key=f"fig_{spec.key}",
                    config={"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}})
    st.caption(spec.caption)
    ui.export_row(spec.key, fig, df, manifest=lambda: ui.provenance_manifest(view, ctx))
