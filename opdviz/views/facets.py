"""Facet grids of many runs: a grid draws at most ``MAX_PANELS`` panels, spread evenly over the values, and
says so (``facet_note``); a dashboard page draws at most as many runs (``drawn_runs``)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

# A facet grid draws at most this many panels (4 × 3). A sweep of 50 runs would otherwise get 50 panels
# 17 rows deep, unreadable at any width and 1–2 s of Plotly work per figure; the panels shown are
# spread evenly over the runs (first and last included), and the figure says which (``facet_note``).
MAX_PANELS = 12


def _spread(values: list, n: int) -> list:
    """``n`` of ``values`` spread evenly, in order, the first and (for n ≥ 2) the last included."""
    if n >= len(values):
        return list(values)
    if n <= 0:
        return []
    picks = np.unique(np.linspace(0, len(values) - 1, n).round().astype(int))
    return [values[i] for i in picks]


def facet_values(values: list) -> list:
    """``values`` when there are at most ``MAX_PANELS``; else ``MAX_PANELS`` of them evenly spread, in
    order, the first and the last included."""
    return _spread(list(values), MAX_PANELS)


def drawn_runs(run_ids: list[str], keep: tuple[str, ...] = ()) -> list[str]:
    """The runs a dashboard page draws out of ``run_ids`` (in their order): all of them when there are at
    most ``MAX_PANELS``; else ``MAX_PANELS`` of them — those in ``keep`` (a Compare page's run A and B) and
    the rest spread evenly, first and last included."""
    if len(run_ids) <= MAX_PANELS:
        return list(run_ids)
    kept = [r for r in dict.fromkeys(keep) if r in run_ids][:MAX_PANELS]
    chosen = set(kept) | set(_spread([r for r in run_ids if r not in kept], MAX_PANELS - len(kept)))
    return [r for r in run_ids if r in chosen]


def facet_note(fig: go.Figure) -> str | None:
    """A sentence for under a figure whose facet grid shows only some of its panels, else None."""
    meta = fig.layout.meta if isinstance(fig.layout.meta, dict) else {}
    shown, total = meta.get("facets_shown"), meta.get("facets_total")
    if not shown or not total or shown >= total:
        return None
    what = "runs" if meta.get("facet") == "run_id" else f"{meta.get('facet')} values"
    return (f"Panels for {shown} of the {total} {what}, spread evenly in order (first and last included): a "
            f"grid of {total} panels is unreadable. Select the {what} to draw (the dashboard's sidebar, "
            f"`--run` of `opdviz figures`, `Selection(runs=…)`); the figure's data holds all {total}.")


def mark_facets(fig: go.Figure, facet: str, shown: int, total: int) -> None:
    """Record in the figure's meta how many facet panels it draws of how many (read by ``facet_note``)."""
    fig.layout.meta = {**(fig.layout.meta or {}), "facet": facet, "facets_shown": shown, "facets_total": total}
