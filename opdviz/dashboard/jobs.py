"""The New analysis page's *Analyses* panel: the store's queued, running and finished jobs, with progress,
results, failures, Cancel and Resume. It polls (a fragment rerun every second) while a job is active.

The jobs run in a detached worker process (``opdviz.engine.queue``); this panel only reads their state
from disk, so it survives reloads and closed tabs.
"""

from __future__ import annotations

import streamlit as st

from opdviz.engine import queue as jobs
from opdviz.errors import OpdvizError
from opdviz.store import queries
from opdviz.store import Store

from opdviz.dashboard.new_analysis import Session
from opdviz.dashboard.text import code, md

SHOWN_JOBS = 8


def panel(s: Session) -> None:
    """The *Analyses* heading and the jobs, redrawn every second while one is queued or running."""
    st.subheader("Analyses")
    try:
        polling = any(j.active for j in jobs.list_jobs(s.db))
    except OpdvizError:
        polling = False
    st.fragment(_jobs_panel, run_every=1.0 if polling else None)(s, polling)


def _eta(seconds) -> str:
    if seconds is None:
        return "ETA …"
    s = int(seconds)
    return f"ETA {s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"ETA {s // 60}:{s % 60:02d}"


def _run_line(r: jobs.RunProgress, state: str) -> str:
    if r.n_total is None:
        return f"{md(r.run_id)}: " + ("starting (reading the checkpoint headers)…" if state == "running" else "not started")
    parts = [f"{md(r.run_id)}: {r.n_done}/{r.n_total} tensors"]
    if r.bytes_total:
        parts.append(f"{r.bytes_done / 1e6:,.1f}/{r.bytes_total / 1e6:,.1f} MB")
    if r.status == "running":
        parts.append(_eta(r.eta_s))
        if r.current:
            parts.append(md(r.current))
    return " · ".join(parts)


def _show_job(s: Session, job: jobs.JobStatus, waiting: bool) -> None:
    label = {"queued": ":material/schedule: queued", "running": ":material/progress_activity: running",
             "done": ":material/check_circle: done", "failed": ":material/error: failed",
             "cancelled": ":material/cancel: cancelled"}[job.state]
    runs = md(", ".join(f"{r.run_id} ({r.method})" for r in job.runs))
    st.markdown(f"**{runs}** · {label} · base {code(s.short(job.base))} · job {code(job.id)}")
    if job.state == "queued":
        st.caption("Waiting for the job ahead of it to finish." if waiting else "Starting…")
    for r in job.runs:
        if job.state in ("running", "failed", "cancelled") or r.n_total:
            st.progress(r.fraction, text=_run_line(r, job.state))
    if job.state == "done":
        for r in job.runs:
            bits = [f"{r.n_skipped} skipped"] if r.n_skipped else []
            if r.n_failed:
                bits.append(f"{r.n_failed} failed")
            st.success(f"{md(r.run_id)}: finished" + (f" ({', '.join(bits)})" if bits else "") + ".",
                       icon=":material/check_circle:")
            if r.n_failed:
                _failures(s, r.run_id)
    elif job.state == "failed":
        st.error(s.clean(job.error) or "the job failed", icon=":material/error:")
    elif job.state == "cancelled":
        st.warning(s.clean(job.error or "cancelled"), icon=":material/cancel:")
    row = st.container(horizontal=True)
    if job.state in ("queued", "running"):
        if row.button("Cancel", key=f"cancel_{job.id}", icon=":material/stop:"):
            _act(s, jobs.cancel, job.id)
    if job.state in ("failed", "cancelled"):
        if row.button("Resume", key=f"resume_{job.id}", icon=":material/replay:",
                      help="Queue it again; tensors already stored are not recomputed."):
            _act(s, jobs.resume, job.id, start=True)
    if any(r.n_done for r in job.runs):
        row.page_link("pages/sparsity.py", label="Open the Sparsity page", icon=":material/grain:",
                      query_params={"run": [r.run_id for r in job.runs]})


def _failures(s: Session, run_id: str) -> None:
    try:
        df = queries.failures(Store(s.db), run_id)
    except OpdvizError as exc:
        st.error(md(exc))
        return
    if not df.empty:
        with st.expander(f"{len(df)} tensor(s) of {md(run_id)} failed (e.g. NaN/Inf weights) — recorded, the job went on"):
            st.dataframe(df[["tensor", "stage", "error", "message"]], hide_index=True)


def _act(s: Session, fn, job_id: str, start: bool = False) -> None:
    try:
        fn(s.db, job_id)
        if start:
            jobs.ensure_worker(s.db)
    except OpdvizError as exc:
        st.error(s.clean(str(exc)), icon=":material/error:")
        return
    st.rerun(scope="app")


def _jobs_panel(s: Session, polling: bool) -> None:
    try:
        listed = jobs.list_jobs(s.db)
        if any(j.state == "queued" for j in listed):
            jobs.ensure_worker(s.db)  # no-op while a worker runs; restarts one that went away
    except OpdvizError as exc:
        st.error(s.clean(str(exc)), icon=":material/error:")
        return
    if not listed:
        st.caption("No analyses yet.")
        return
    if polling and not any(j.active for j in listed):
        st.rerun(scope="app")  # everything finished: redraw the page once and stop polling
    ahead = [j for j in listed if j.active]
    for job in reversed(listed[-SHOWN_JOBS:]):
        with st.container(border=True, key=f"job_{job.id}"):
            _show_job(s, job, waiting=bool(ahead) and ahead[0].id != job.id)
