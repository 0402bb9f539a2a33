"""Figures and tables on a page: the page's figures with their export rows, one figure (``chart``), and
number tables formatted by the metric catalog's units.

Exports are made only when a button is clicked (callable ``data``); a figure's ZIP bundles it with its
data and the provenance manifest, the download that says where its numbers came from.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Callable

import pandas as pd
import streamlit as st

from opdviz.errors import OpdvizError
from opdviz.views import export as figexport
from opdviz.views import formatting
from opdviz.views import registry
from opdviz.views.facets import drawn_runs, facet_note

from opdviz.dashboard.cache import View, query, warmer
from opdviz.dashboard.header import approx_notice
from opdviz.dashboard.text import md

FORMATS = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf", "html": "text/html",
           "csv": "text/csv", "parquet": "application/vnd.apache.parquet"}
PLOTLY_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}


def figures(view: View, page: str) -> None:
    """Every FigureSpec of ``page``: figure (full width), caption, export row; one zip for the page.

    Figures are built on a small thread pool (DuckDB and pandas release the GIL) and drawn in order as
    they arrive; afterwards the other pages' figures for this selection are warmed in the background.
    """
    specs = registry.figures_for(page)
    view = drawn(view)
    approx_notice(view)
    zip_slot = st.container()
    built = []
    builder = warmer()
    futures = [builder.submit((view.db, view.stamp, spec.key, view.sel, view.ctx)) for spec in specs]
    for i, (spec, future) in enumerate(zip(specs, futures)):
        try:
            fig, df = future.result()
        except OpdvizError as exc:
            st.error(md(exc))
            st.stop()
        built.append((spec.key, fig, df))
        chart(i, spec.key, fig, df, spec.caption, manifest=lambda: provenance_manifest(view))
    if built:
        zip_slot.download_button(":material/folder_zip: Download this page as a zip (paper-sized PDFs + data + "
                                 "manifest)",
                                 data=lambda: figexport.page_zip(built, fmt="pdf", width="single",
                                                                 manifest=provenance_manifest(view)),
                                 file_name=f"opdviz_{page}.zip", mime="application/zip", on_click="ignore",
                                 key=f"zip_{page}")
    builder.warm(view, exclude=page)


def drawn(view: View) -> View:
    """``view`` with its selection narrowed to the runs a page draws (``facets.drawn_runs``: at most 12,
    spread evenly, a Compare page's run A and B kept), saying so above the figures when it narrows."""
    runs = query("runs", view.db, view.stamp)
    ids = sorted(r for r in runs["run_id"] if not view.sel.runs or r in view.sel.runs)
    picks = drawn_runs(ids, keep=tuple(r for r in (view.ctx.run_a, view.ctx.run_b) if r))
    if len(picks) == len(ids):
        return view
    st.info(f"This page draws {len(picks)} of the {len(ids)} selected runs, spread evenly in run order (first "
            f"and last included{', run A and B kept' if view.ctx.run_a or view.ctx.run_b else ''}): "
            + ", ".join(f"**{md(r)}**" for r in picks) + f". A figure of {len(ids)} runs (a panel or a line each) "
            "is unreadable. Choose the runs to draw in the sidebar's *Runs* filter; the Overview table lists "
            f"all {len(ids)}.", icon=":material/filter_list:")
    return dataclasses.replace(view, sel=dataclasses.replace(view.sel, runs=tuple(picks)))


def provenance_manifest(view: View, ctx=None) -> dict:
    """The export manifest (store, runs with paths and fingerprints, options, filters, version, date) of
    what ``view`` shows; ``ctx`` replaces the view's context (Overlap/Trajectory page choices)."""
    return figexport.manifest(view.store, view.sel, ctx if ctx is not None else view.ctx)


def export_row(key: str, fig, df: pd.DataFrame, manifest: Callable[[], dict] | None = None) -> None:
    """Download buttons; the bytes are made only when a button is clicked (callable ``data``). With
    ``manifest`` (a callable giving ``figexport.manifest``), a ZIP button bundles the figure (PDF and PNG),
    its data (CSV) and manifest.json — the download that says where its numbers came from."""
    row = st.container(horizontal=True, vertical_alignment="center", gap="small")
    row.caption("Figure", width="content")
    for fmt in ("png", "svg", "pdf", "html"):
        row.download_button(fmt.upper(), data=_lazy(figexport.figure_bytes, fig, fmt), file_name=f"{key}.{fmt}",
                            mime=FORMATS[fmt], on_click="ignore", key=f"dl_{key}_{fmt}", type="secondary")
    row.caption("· Data", width="content")
    for fmt, label in (("csv", "CSV"), ("parquet", "Parquet")):
        row.download_button(label, data=_lazy(figexport.data_bytes, df, fmt), file_name=f"{key}.{fmt}",
                            mime=FORMATS[fmt], on_click="ignore", key=f"dl_{key}_{fmt}", type="secondary",
                            disabled=df is None or df.empty)
    if manifest is not None:
        row.caption("· With provenance", width="content")
        row.download_button("ZIP", data=lambda: _figure_zip(key, fig, df, manifest()), file_name=f"{key}.zip",
                            mime="application/zip", on_click="ignore", key=f"dl_{key}_zip", type="secondary",
                            help="The figure as PDF and PNG, its data as CSV, and manifest.json (store, runs, "
                                 "checkpoint paths and fingerprints, options, filters, version, date).")


def _figure_zip(key: str, fig, df: pd.DataFrame, manifest: dict) -> bytes:
    pdf = figexport.page_zip([(key, fig, df)], fmt="pdf", manifest=manifest)
    buf = io.BytesIO(pdf)
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr(f"{key.replace('.', '-')}.png", figexport.figure_bytes(fig, "png"))
    return buf.getvalue()


def _lazy(fn: Callable, *args) -> Callable[[], bytes]:
    return lambda: fn(*args)


def percent(df: pd.DataFrame, prefixes: tuple[str, ...]) -> pd.DataFrame:
    """A copy with the fraction columns starting with ``prefixes`` scaled to percent (for display)."""
    out = df.copy()
    for c in out.columns:
        if c.startswith(prefixes):
            out[c] = 100 * out[c].astype(float)
    return out


def numbers_table(df: pd.DataFrame, labels: dict[str, str] | None = None, **config) -> None:
    """``df`` as a table whose every number is scaled and formatted by its unit in the metric catalog
    (``opdviz.views.formatting``: fractions in %, ratios plain, angles in degrees); ``labels`` rename headers,
    ``config`` adds or overrides Streamlit column configs (text columns)."""
    cols = {c: st.column_config.NumberColumn(head, format=fmt)
            for c, (head, fmt) in formatting.column_formats(df, labels).items()}
    cols.update({c: v for c, v in config.items()})
    st.dataframe(formatting.display(df), hide_index=True, width="stretch", column_config=cols)


def chart(i: int, key: str, fig, df: pd.DataFrame, caption: str, manifest: Callable[[], dict] | None = None) -> None:
    """One figure of a page: a divider before all but the first, the chart, its caption and export row."""
    if i:
        st.divider()
    st.plotly_chart(fig, width="stretch", theme=None, key=f"fig_{key}", config=PLOTLY_CONFIG)
    if note := facet_note(fig):
        st.caption(note)
    if caption:
        st.caption(caption)
    export_row(key, fig, df, manifest=manifest)
