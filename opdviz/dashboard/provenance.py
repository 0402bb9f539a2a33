"""The Overview page's run records: for each shown run, an expander with where its numbers came from
(inputs, LoRA adapter, job, options, package versions, training metadata) and the tensors not analysed.
A sweep of many runs gets one table of every run and the full record of the run chosen under it (fifty
expanders cost about a second to draw on every rerun).
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import streamlit as st

from opdviz.views import formatting

from opdviz.dashboard.cache import View, query
from opdviz.dashboard.text import md, md_frame

INPUT_FIELDS = ("base_path", "base_fingerprint", "base_bytes", "post_path", "post_fingerprint", "post_bytes", "kind",
                "dtype")
JOB_FIELDS = ("device", "seed", "status", "error", "created_at", "finished_at", "wall_s", "n_tensors", "n_done",
              "n_skipped", "n_failed")
NONE_BAD = pd.DataFrame(columns=["tensor", "status", "reason"])     # a run whose every tensor was analysed
# up to this many shown runs, each gets its expander; more get one table and the record of a chosen run
EXPANDERS_UP_TO = 10


def provenance_rows(prov: dict, keys: Iterable[str]) -> pd.DataFrame:
    """Two-column (field, value) table of the provenance ``keys`` that are set, byte counts humanised."""
    fields, values = [], []
    for k in keys:
        v = prov.get(k)
        if v is None or v == "":
            continue
        if k.endswith("_bytes") and isinstance(v, (int, float)):
            v = formatting.human_bytes(v)
        elif k == "wall_s" and isinstance(v, (int, float)):
            v = f"{v:.1f} s"
        fields.append(k)
        values.append(str(v))
    return pd.DataFrame({"value": values}, index=pd.Index(fields, name="field"), dtype=None if values else object)


def run_records(view: View) -> None:
    """The records of the runs in the selection (all runs when none is chosen): one expander per run, or
    for a sweep (more than ``EXPANDERS_UP_TO``) one table of all of them and the chosen run's record."""
    runs = query("runs", view.db, view.stamp)
    shown_runs = runs[runs["run_id"].isin(view.sel.runs)] if view.sel.runs else runs
    provs = query("provenances", view.db, view.stamp)      # every run's record and skipped/failed
    bad = query("not_ok", view.db, view.stamp)               # tensors: one query each, not one per run
    ids = list(shown_runs["run_id"])
    if len(ids) <= EXPANDERS_UP_TO:
        for run_id in ids:
            _run_record(run_id, provs.get(run_id, {}), bad.get(run_id, NONE_BAD))
        return
    st.dataframe(runs_table(ids, provs, bad), hide_index=True, width="stretch")
    run_id = st.selectbox("Record of run", ids, key="provenance_run")
    _run_record(run_id, provs.get(run_id, {}), bad.get(run_id, NONE_BAD), expanded=True)


def runs_table(ids: list[str], provs: dict[str, dict], bad: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per run: what each run's expander label says (method, status, tensors done, skipped,
    failed) and its inputs and job at a glance; the chosen run's record holds the rest."""
    rows = []
    for run_id in ids:
        prov, not_ok = provs.get(run_id, {}), bad.get(run_id, NONE_BAD)
        rows.append({"run": run_id, "method": prov.get("method"), "status": prov.get("status"),
                     "done": prov.get("n_done"), "tensors": prov.get("n_tensors"),
                     "skipped": int((not_ok["status"] == "skipped").sum()),
                     "failed": int((not_ok["status"] == "failed").sum()), "kind": prov.get("kind"),
                     "post": prov.get("post_path"), "device": prov.get("device"), "wall_s": prov.get("wall_s"),
                     "finished_at": prov.get("finished_at")})
    return pd.DataFrame(rows)


def _run_record(run_id: str, prov: dict, bad: pd.DataFrame, expanded: bool = False) -> None:
    n_skip, n_fail = int((bad["status"] == "skipped").sum()), int((bad["status"] == "failed").sum())
    label = md(f"{run_id} — {prov.get('method')}, {prov.get('status')}, {prov.get('n_done')}/"
               f"{prov.get('n_tensors')} tensors, {n_skip} skipped, {n_fail} failed")
    with st.expander(label, expanded=expanded, icon=":material/warning:" if n_fail else ":material/description:"):
        left, right = st.columns(2)
        left.markdown("**Inputs**")
        left.table(md_frame(provenance_rows(prov, INPUT_FIELDS)))
        adapter = (prov.get("extra") or {}).get("adapter")
        if isinstance(adapter, dict):     # a PEFT LoRA adapter analysed as its merge into the base
            left.markdown("**LoRA adapter**: " + md(_adapter_line(adapter)))
        right.markdown("**Job**")
        right.table(md_frame(provenance_rows(prov, JOB_FIELDS)))
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


def _adapter_line(adapter: dict) -> str:
    """The adapter's rank, alpha, scaling and modules (adapter_config.json is the checkpoint's text: the
    caller shows it literally)."""
    ranks = sorted({int(r) for r in (adapter.get("ranks") or {}).values() if isinstance(r, (int, float))})
    return (f"rank r = {adapter.get('r')}"
            + (f" (per module {ranks[0]}–{ranks[-1]})" if len(ranks) > 1 else "")
            + f", lora_alpha = {adapter.get('lora_alpha')}"
            + (", rsLoRA (scale α/√r)" if adapter.get("use_rslora") else " (scale α/r)")
            + f", {adapter.get('n_lora_modules')} LoRA modules"
            + (f", modules_to_save {adapter.get('modules_to_save')}" if adapter.get("modules_to_save") else ""))
