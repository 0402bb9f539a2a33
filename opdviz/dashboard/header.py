"""A page's head: title, introduction, the empty state, and notices about running or unfinished runs and
approximate values.

A figure page starts with ``view = header.begin(title, intro)``: it returns the current ``View`` (store,
stamp, Selection, ViewContext, from the sidebar) or stops the page with what to do when there is nothing
to show.
"""

from __future__ import annotations

import contextlib

import pandas as pd
import streamlit as st

from opdviz.engine.progress import read_progress
from opdviz.io import roots
from opdviz.store import Store

from opdviz.dashboard.cache import View, query
from opdviz.dashboard.routes import route_through_app
from opdviz.dashboard.sidebar import shared
from opdviz.dashboard.text import code, md

HOW_TO_GET_DATA = """\
**How to get data**

* try the dashboard on a small generated example: `opdviz demo`
* analyse your own checkpoints: {compute}
  (BASE and POST: a `.safetensors` file or a Hugging Face model folder)
* or queue one from the browser on the **New analysis** page (below),
* or choose another store in the sidebar's *Database* list (the stores under the folders the operator
  offers: `OPDVIZ_STORE_ROOTS`).

Then reload this page.
"""


def begin(title: str, intro: str) -> View:
    """Title, explanation and status notices; returns the current View or stops with the empty state."""
    route_through_app()
    st.title(title)
    st.markdown(intro)
    state = shared() or {"db": roots.DEFAULT_DB, "ready": False}
    if state.get("error"):
        st.error(md(state["error"]))
        st.stop()
    if not state["ready"]:
        db = state["db"]
        what = "has no runs yet" if Store(db).exists() else "does not exist"
        st.info(f"The database {code(db)} {what}.\n\n" + HOW_TO_GET_DATA.format(
            compute=code(f"opdviz compute BASE POST --method OPD --db {db}")), icon=":material/info:")
        st.page_link("pages/new_analysis.py", label="New analysis", icon=":material/add_circle:")
        st.stop()
    view = View(state["db"], state["stamp"], state["sel"], state["ctx"])
    _run_notices(view, state["runs"])
    return view


def _run_notices(view: View, runs: pd.DataFrame) -> None:
    shown = runs[runs["run_id"].isin(view.sel.runs)] if view.sel.runs else runs
    for row in shown.itertuples():
        if row.status == "running":
            n_total = int(row.n_tensors or 0)
            n_done, current = _progress(view, row.run_id)
            frac = min(1.0, n_done / n_total) if n_total else 0.0
            st.info(f"Run **{md(row.run_id)}** is still computing: {n_done} of {n_total} tensors done. The figures "
                    "show the tensors finished so far; refresh to pick up new results."
                    + (f" Now on {code(current)}." if current else ""), icon=":material/hourglass_top:")
            bar, button = st.columns([5, 1], vertical_alignment="center")
            bar.progress(frac, text=f"{md(row.run_id)}: {n_done}/{n_total} tensors")
            button.button("Refresh", key=f"refresh_{row.run_id}", icon=":material/refresh:")
        elif row.status not in ("done", None):
            st.warning(f"Run **{md(row.run_id)}** is {code(row.status)}" + (f": {md(row.error)}" if row.error else "") +
                       ". Its finished tensors are shown; rerun the same `opdviz compute` command (or Resume on "
                       "the New analysis page) to compute the rest.", icon=":material/warning:")


def _progress(view: View, run_id: str) -> tuple[int, str]:
    """Tensors done so far: the job's progress file when present (fresh every tensor), else a count."""
    state = read_progress(Store(view.db), run_id)
    if state is not None:
        with contextlib.suppress(TypeError, ValueError):
            return int(state.get("n_done", 0)), str(state.get("current") or "")
    return query("n_top_done", view.db, view.stamp, run_id), ""


def approx_notice(view: View) -> None:
    """Say so when some selected matrices have approximate spectra: their spectral and geometry numbers
    (figures, tables, exports) are approximate. Exports say it too (manifest.json, README.txt)."""
    counts = query("approx_counts", view.db, view.stamp, view.sel)
    if counts:
        runs = ", ".join(f"**{r}** ({n})" for r, n in counts.items())
        st.info(f"≈ Approximate values: some matrices' spectra came from the randomized top-k solver — {runs} "
                "matrices. Their spectra, ranks, energies, projections, angles and principal coverage are "
                "approximate (errors measured in the README, *Exact and approximate spectra*); recompute with "
                "`--spectrum exact` (or on a GPU) for exact values.", icon=":material/info:")
