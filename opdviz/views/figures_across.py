"""Figures across runs and along trajectories: pure functions DataFrame → Plotly figure.

No I/O, no SQL, no torch. Built on ``opdviz.views.figures`` (its template, colours, heatmap and line
helpers), so these figures look like, and export like, every other opdviz figure.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from opdviz.views import figures as F
from opdviz.views import style

PCT = " (%)"


def overlap_heatmaps(df: pd.DataFrame, panels: list[tuple[str, str]], zlabel: str, title: str,
                     ratio: bool = False) -> go.Figure:
    """Layer × module heatmaps, one panel per (column, panel title) in ``panels``, one colour axis.

    ``df``: one row per (layer, module) with the columns named in ``panels`` (fractions, shown in %,
    or, with ``ratio``, observed ÷ baseline shown as log₂ on a diverging scale centred on 0 = chance)."""
    cols = [c for c, _ in panels if c in df]
    if df.empty or not cols or df[cols].notna().sum().sum() == 0:
        return F.empty_figure(title=title)
    long = []
    for col, panel in panels:
        part = df[["layer", "module", col]].rename(columns={col: "value"})
        part["panel"] = panel
        long.append(part)
    d = pd.concat(long, ignore_index=True)
    if not ratio:
        d["value"] = 100 * d["value"].astype(float)
        # four panels as 2 × 2: in one row, eight module labels no longer fit a column-wide panel
        return F.heatmap(d, "value", zlabel, title, facet="panel", zmin=0, max_cols=2 if len(panels) == 4 else len(panels))
    # log₂ so that 2× and ½× chance get opposite colours of one strength, centred on chance (0)
    v = d["value"].astype(float)
    d["value"] = np.log2(v.where(v > 0))
    return F.heatmap(d, "value", zlabel, title, facet="panel", colorscale=style.DIVERGING, zmid=0.0,
                     max_cols=len(panels), fmt=".2g")


def overlap_by_criterion(df: pd.DataFrame, title: str) -> go.Figure:
    """Whole-selection Jaccard and one-sided coverages per criterion, each next to its independence
    baseline (grey). Columns: criterion, jaccard, jaccard_baseline, cov_a, cov_a_baseline, cov_b,
    cov_b_baseline (fractions)."""
    if df.empty:
        return F.empty_figure(title=title)
    fig = style.base_figure(title)
    xs = [str(c) for c in df["criterion"]]
    colors = (style.OKABE_ITO["blue"], style.OKABE_ITO["vermillion"], style.OKABE_ITO["bluish_green"])
    for (col, name), color in zip((("jaccard", "Jaccard |A∩B|/|A∪B|"), ("cov_a", "|A∩B|/|A|"),
                                   ("cov_b", "|A∩B|/|B|")), colors):
        fig.add_trace(go.Bar(x=xs, y=100 * df[col].astype(float), name=name, marker=dict(color=color),
                             offsetgroup=col, hovertemplate=f"%{{x}}<br>{name}: %{{y:.3g}} %<extra></extra>"))
        fig.add_trace(go.Bar(x=xs, y=100 * df[f"{col}_baseline"].astype(float), name=f"{name}: independence",
                             offsetgroup=col, base=0, width=0.08, marker=dict(color=style.BASELINE_COLOR),
                             showlegend=col == "jaccard", legendgroup="baseline",
                             hovertemplate="%{x}<br>independence baseline: %{y:.3g} %<extra></extra>"))
    fig.data[1].name = "independence baseline (grey)"
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_xaxes(title_text="“changed” criterion", type="category", showgrid=False)
    # linear from 0: a log-scale bar has no zero and its length means nothing
    fig.update_yaxes(title_text="overlap" + PCT, rangemode="tozero")
    return fig


def step_lines(df: pd.DataFrame, y: str, ylabel: str, title: str, color: str = "module", percent: bool = False,
               log_y: bool = False, baseline: float | None = None, baseline_name: str = "") -> go.Figure:
    """``y`` against the training step, one line per ``color`` value (default: per module).

    Columns: step, ``y``, ``color``. ``percent`` scales fractions to %; ``baseline`` draws a dotted
    grey reference line (e.g. Sim_K of random subspaces)."""
    if df.empty or y not in df or df[y].notna().sum() == 0:
        return F.empty_figure(title=title)
    d = df[df[y].notna()].copy()
    if percent:
        d[y] = 100 * d[y].astype(float)
    fig = F.lines(d, "step", y, color, title, "training step", ylabel, markers=d["step"].nunique() <= 20,
                   log_y=log_y)
    if baseline is not None:
        steps = sorted(d["step"].unique())
        F.baseline(fig, [steps[0], steps[-1]], [baseline * (100 if percent else 1)] * 2, baseline_name)
    return fig
