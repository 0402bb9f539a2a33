"""Trajectory page: how the update of one training run builds up, checkpoint by checkpoint."""

import streamlit as st

from opdviz.views import registry
from opdviz.views.across import STEP_METRICS
from opdviz.views.context import AcrossContext
from opdviz.engine.live import REFRESH_S, read_status, training_log
from opdviz.dashboard import cache, header, params, render, text

view = header.begin("Trajectory", r"""Checkpoints of one run at steps $t$, each compared with the base: $\Delta_t = W_t -
W_\text{base}$. **Per-pair metrics** of every step run against the step; **consecutive sparsity**, the share of
entries unchanged between checkpoints $t-1$ and $t$; **updates outside the final mask**, the entries changed at $t$
that the final checkpoint leaves unchanged; **subspace locking** $\mathrm{Sim}_K(t) = \tfrac1K\lVert V_K(t)^\top
V_K(T)\rVert_F^2$ with $V_K$ the top-$K$ right singular vectors of $\Delta_t$ (*On the Geometry of On-Policy
Distillation*, arXiv 2606.07082); and the Hill estimate of the heavy-tail exponent of the spectrum of $\Delta_t$.""")


trajs = cache.across("trajectories", view.db, view.stamp)
if trajs.empty:
    st.info("No trajectory in this database yet. Analyse the checkpoints of one run, step by step:\n\n"
            f"{text.code(f'opdviz trajectory --db {view.db} BASE RUN_FOLDER --name NAME --method LABEL')}\n\n"
            "(RUN_FOLDER holds `checkpoint-100/`, `checkpoint-200/`, …; or list checkpoints with `--steps`), "
            "then reload.", icon=":material/info:")
    st.stop()

names = list(trajs["trajectory"])
c_t, c_m = st.columns([1, 1])
params.sticky("p_traj", "traj", names, names[0])
name = c_t.selectbox("Trajectory", names, key="p_traj",
                     format_func=lambda n: f"{n} ({trajs.set_index('trajectory').at[n, 'method']}, "
                                           f"{trajs.set_index('trajectory').at[n, 'n_steps']} steps)")
metrics = list(STEP_METRICS)
params.sticky("p_tmetric", "tmetric", metrics, "sparsity")
metric = c_m.selectbox("Per-step metric", metrics, key="p_tmetric", format_func=lambda m: STEP_METRICS[m])
for key, value in (("p_traj", name), ("p_tmetric", metric)):
    params.remember(key, value)
params.sync_params({"traj": None if name == names[0] else name, "tmetric": None if metric == "sparsity" else metric})
live = read_status(view.db, name)            # recorded by OpdvizCallback during training, else None
running = bool(live) and live.get("status") == "running"
if live:
    steps = live.get("steps_done") or []
    text = {"running": f"**Training in progress**: step {live.get('train_step')}; {len(steps)} snapshot(s) analysed"
                       + (f", {len(live.get('steps_queued') or [])} queued" if live.get("steps_queued") else "")
                       + f". This page refreshes every {REFRESH_S:g} s while the trajectory grows.",
            "done": f"Recorded live during training: {len(steps)} snapshots, every "
                    f"{live.get('every_n_steps')} steps, to step {live.get('train_step')}.",
            "interrupted": "Training stopped before its end; the steps stored so far are shown.",
            "failed": "The live analysis failed."}.get(live.get("status"), "")
    st.info(text, icon=":material/model_training:")
    if live.get("status") in ("interrupted", "failed") and live.get("message"):
        st.code(live["message"], language=None)
if running and not bool(trajs.set_index("trajectory").at[name, "has_metrics"]):
    st.caption("The trajectory metrics (consecutive sparsity, outside the final mask, Sim_K) need the final "
               "checkpoint: they appear when training ends. Per-step figures grow as snapshots are analysed.")
elif not bool(trajs.set_index("trajectory").at[name, "has_metrics"]):
    st.warning(f"Trajectory **{text.md(name)}** has per-step runs but no trajectory metrics yet (is `opdviz trajectory` "
               "still running?). Per-step figures are shown; rerun the same command to finish.")
ctx = AcrossContext(criterion=view.ctx.criterion, trajectory=name, metric=metric)


def _figures(stamp: tuple) -> None:
    log = training_log(view.store, name) if live else None
    if log is not None and not log.empty:
        with st.expander(f"Training log: loss and learning rate at the {len(log)} stored steps"):
            st.dataframe(log, hide_index=True, width="stretch")
    for i, spec in enumerate(registry.figures_for("trajectory")):
        fig, df = cache.across(spec.key, view.db, stamp, view.sel, ctx)
        render.chart(i, spec.key, fig, df, spec.caption, manifest=lambda: render.provenance_manifest(view, ctx))


if running:   # re-query with a fresh stamp every few seconds while the worker adds steps
    st.fragment(run_every=REFRESH_S)(lambda: _figures(cache.stamp(view.db)))()
else:
    _figures(view.stamp)
