"""Figures: pure functions from tidy DataFrames to Plotly figures (no I/O, no SQL, no streamlit, no torch).

Every function documents the columns it reads. How they look (colours per method and module, template,
paper sizing) is ``opdviz.views.style``.

Try it:  python -c "import opdviz.views.figures as f, pandas as pd; f.empty_figure().show()"
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from opdviz.views.facets import facet_values, mark_facets
from opdviz.views.formatting import escape
from opdviz.views.style import (BASELINE_COLOR, DASHES, DIVERGING, SEQUENTIAL, base_figure, method_color, module_color,
                                 module_sort_key, run_label, run_shades, run_styles, with_traces)

NO_DATA = "no data for this selection"
def empty_figure(message: str = NO_DATA, title: str = "") -> go.Figure:
    """A blank figure that says why it is blank (never raise on an empty selection)."""
    fig = base_figure(title)
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=15, color="#555555"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(meta={"empty": True, "panels": 1, "rows": 1})
    return fig


def _legend_key(entries: list[tuple[str, str, str]]) -> list[dict]:
    """Legend-only traces: (name, colour, dash). Lets a figure key colour and dash separately
    (no legend groups: in a horizontal legend a group stacks its items vertically)."""
    return [dict(type="scatter", x=[None], y=[None], mode="lines", name=name, showlegend=True,
                 line=dict(color=color, dash=dash, width=2), hoverinfo="skip")
            for name, color, dash in entries]


def _color_of(kind: str, value, styles: dict) -> str:
    if kind == "run_id":
        return styles.get(value, ("#000000", "solid"))[0]
    if kind == "method":
        return method_color(value)
    if kind == "module":
        return module_color(value)
    return module_color(str(value))   # a stable sha1 hash, never Python's salted hash()


def ordered(values, kind: str) -> list:
    """The distinct values in order of appearance (modules in their usual order), nulls left out."""
    if isinstance(values, pd.Series):
        values = values.unique().tolist()     # distinct first: a spectrum frame has 10⁵ rows
    vals = list(dict.fromkeys(v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))))
    if kind == "module":
        return sorted(vals, key=module_sort_key)
    return vals


def _vspace(preferred: float, nrows: int) -> float:
    """Row spacing of a facet grid: plotly refuses more than 1/(rows − 1) (a sweep of 50 runs → 17 rows)."""
    return preferred if nrows <= 1 else min(preferred, 0.5 / (nrows - 1))


def lines(df: pd.DataFrame, x: str, y: str, color: str, title: str, xlabel: str, ylabel: str,
           dash: str | None = None, facet: str | None = None, log_x: bool = False, log_y: bool = False,
           markers: bool = False, hover: str | None = None, max_cols: int = 3,
           x_axis: dict | None = None) -> go.Figure:
    """Lines of ``y`` against ``x``, one per (color, dash, facet) value; legends key colour and dash.
    ``x_axis``: more properties of every x axis (nested dicts, e.g. ``integer_ticks``)."""
    styles = run_styles(df) if "run_id" in df and "method" in df else {}
    if color == "run_id" and dash:      # dashes draw ``dash``: runs of one method apart by shade instead
        shades = run_shades(styles)
        styles = {r: (shades[r], d) for r, (_, d) in styles.items()}
    facets = ordered(df[facet], "run") if facet else [None]
    total = len(facets)
    if facet and len(facets := facet_values(facets)) < total:
        df = df[df[facet].isin(facets)]
    ncols = min(len(facets), max_cols)
    nrows = math.ceil(len(facets) / ncols)
    titles = list(map(_namer(df, facet), facets)) if facet else None
    fig = base_figure(title, nrows, ncols, shared_yaxes=True, shared_xaxes=True, subplot_titles=titles,
                  horizontal_spacing=0.04, vertical_spacing=_vspace(0.12, nrows)) if facet else base_figure(title)
    colors = ordered(df[color], color)
    dashes = ordered(df[dash], dash) if dash else [None]
    dash_of = {d: DASHES[i % len(DASHES)] for i, d in enumerate(dashes)}
    name_of = _namer(df, color)
    # split the frame once (a sweep of 50 runs has hundreds of lines), then add every trace in one call
    keys = [k for k in (facet, color, dash) if k]
    parts = dict(iter(df.groupby(keys, sort=False)))
    traces, rows, cols = [], [], []
    for fi, fval in enumerate(facets):
        for cval in colors:
            for dval in dashes:
                part = parts.get(tuple(v for v, k in ((fval, facet), (cval, color), (dval, dash)) if k))
                if part is None:
                    continue
                if not _increasing(part[x]):
                    part = part.sort_values(x)
                line_dash = dash_of[dval] if dash else (styles.get(cval, ("", "solid"))[1] if color == "run_id"
                                                        else "solid")
                name = name_of(cval) + (f" · {escape(dval)}" if dash else "")
                traces.append(dict(           # plain dicts: add_traces validates each trace once
                    type="scatter", x=_plain(part[x]), y=_plain(part[y]), name=name,
                    mode="lines+markers" if markers else "lines",
                    line=dict(color=_color_of(color, cval, styles), dash=line_dash, width=1.8),
                    marker=dict(size=5), showlegend=False,
                    hovertemplate=f"{name}<br>{xlabel}: %{{x}}<br>{ylabel}: %{{y:.4g}}"
                                  + ("<br>%{customdata}" if hover else "") + "<extra></extra>",
                    customdata=part[hover] if hover else None))
                rows.append(fi // ncols + 1)
                cols.append(fi % ncols + 1)
    keys = _legend_key([(name_of(v), _color_of(color, v, styles),
                         styles.get(v, ("", "solid"))[1] if color == "run_id" and not dash else "solid")
                        for v in colors])
    if dash and len(dashes) > 1:
        keys += _legend_key([(escape(d), BASELINE_COLOR, dash_of[d]) for d in dashes])
    axes = dict(x={**dict(type="log" if log_x else "linear", exponentformat="power" if log_x else "B"),
                   **(x_axis or {})},
                y=dict(type="log" if log_y else "linear", exponentformat="power" if log_y else "B"),
                axes=_axis_titles(fig, nrows, ncols, len(facets), xlabel, ylabel))
    if not facet:
        return with_traces(fig, traces + keys, **axes)
    fig = with_traces(fig, traces + keys, rows + [None] * len(keys), cols + [None] * len(keys), **axes)
    mark_facets(fig, facet, len(facets), total)
    return fig


def _increasing(values: pd.Series) -> bool:
    """True when ``values`` strictly increase (already in the order ``sort_values`` would give)."""
    if not _numeric(values):
        return False
    v = values.to_numpy()
    return bool(np.all(v[1:] > v[:-1]))


def _plain(values: pd.Series):
    """A numeric column as its numpy array (what plotly makes of it anyway, at half the cost of a
    Series); any other column as it is."""
    return values.to_numpy() if _numeric(values) else values


def _numeric(values: pd.Series) -> bool:
    return isinstance(values.dtype, np.dtype) and values.dtype.kind in "fiu"


def _axis_titles(fig: go.Figure, nrows: int, ncols: int, npanels: int, xlabel: str, ylabel: str) -> dict[str, dict]:
    """The axis titles of a figure's panels, as ``with_traces``' ``axes``: layout key → {"title": …}."""
    def title(text: str) -> dict:
        return {"title": {"text": text}}

    if nrows * ncols == 1:
        return {"xaxis": title(xlabel), "yaxis": title(ylabel)}
    out = {}
    for i in range(npanels):
        r, c = i // ncols + 1, i % ncols + 1
        # one x title per row of panels, under the middle one (repeated titles collide at column width)
        x_title = (r == nrows or i + ncols >= npanels) and (nrows > 1 or c == (min(ncols, npanels) + 1) // 2)
        xkey, ykey = fig._grid_ref[r - 1][c - 1][0].layout_keys
        if x_title:
            out[xkey] = title(xlabel)
        if c == 1:
            out[ykey] = title(ylabel)
    return out


def _namer(df: pd.DataFrame, kind: str):
    """value of column ``kind`` → its label: a run id with its (first) method, else the escaped value."""
    if kind == "run_id" and "method" in df:
        first = df.drop_duplicates("run_id")
        method = dict(zip(first["run_id"], first["method"]))
        return lambda value: run_label(value, method.get(value))
    return escape


def baseline(fig: go.Figure, x, y, name: str, row: int | None = None, col: int | None = None,
              showlegend: bool = True) -> None:
    trace = go.Scatter(x=list(x), y=list(y), mode="lines", name=name, showlegend=showlegend,
                       line=dict(color=BASELINE_COLOR, dash="dot", width=1.5),
                       hovertemplate=f"{name}<br>%{{x:.3g}} → %{{y:.3g}}<extra></extra>",
                       meta={"baseline": True})
    if row is None:
        fig.add_trace(trace)
    else:
        fig.add_trace(trace, row=row, col=col)


# --------------------------------------------------------------------------------------- heatmaps
def heatmap(df: pd.DataFrame, z: str, zlabel: str, title: str, x: str = "module", y: str = "layer",
            facet: str | None = "run_id", zmin: float | None = None, zmax: float | None = None,
            text: bool = False, fmt: str = ".2f", colorscale: str = SEQUENTIAL, zmid: float | None = None,
            max_cols: int = 4) -> go.Figure:
    """Layer × module heatmap of ``z``, one panel per ``facet`` value (default: per run), shared colour axis.

    Columns: ``x`` (module), ``y`` (layer, int), ``z``, and ``facet`` (+ method for the panel titles).
    Rows with a null ``y`` (embedding, head) are left out: they have no layer.
    """
    df = df[df[y].notna()] if y in df else df
    if df.empty or z not in df or df[z].notna().sum() == 0:
        return empty_figure(title=title)
    facets = ordered(df[facet], "run") if facet else [None]
    total = len(facets)
    if facet and len(facets := facet_values(facets)) < total:
        df = df[df[facet].isin(facets)]
    ncols = min(len(facets), max_cols)
    nrows = math.ceil(len(facets) / ncols)
    titles = list(map(_namer(df, facet), facets)) if facet else None
    # rows of panels leave room for the slanted module labels and the next row's panel titles
    fig = base_figure(title, nrows, ncols, shared_yaxes=True, subplot_titles=titles, horizontal_spacing=0.03,
                  vertical_spacing=_vspace(0.1, nrows)) if facet else base_figure(title)
    if nrows > 1:
        fig.update_layout(height=340 * nrows)
    xs = ordered(df[x], x)
    ys = sorted(int(v) for v in df[y].dropna().unique())
    # the mean of z per (panel, y, x) in one groupby, then one grid per panel, every trace added at once
    means = df.groupby(([facet] if facet else []) + [y, x])[z].mean().unstack(x)
    present = set(means.index.get_level_values(0)) if facet else set()
    traces = []
    for fval in facets:
        cells = means if fval is None else means.loc[fval] if fval in present else pd.DataFrame(dtype=float)
        grid = cells.reindex(index=ys, columns=xs)
        traces.append(dict(type="heatmap", z=grid.to_numpy(dtype=float), x=xs, y=ys, coloraxis="coloraxis", xgap=1,
                           ygap=1, hovertemplate=f"{x}: %{{x}}<br>{y}: %{{y}}<br>{zlabel}: %{{z:.4g}}<extra>"
                                                 f"{'' if fval is None else escape(fval)}</extra>",
                           texttemplate=f"%{{z:{fmt}}}" if text else None, textfont=dict(size=9)))
    # every category labelled (plotly thins crowded category ticks otherwise); slanted when crowded
    axes = dict(x=dict(type="category", showgrid=False, dtick=1, tickangle=-90 if len(xs) * ncols > 10 else 0),
                y=dict(showgrid=False, dtick=_layer_dtick(len(ys))),
                axes=_axis_titles(fig, nrows, ncols, len(facets), "module" if x == "module" else x,
                                  "layer index" if y == "layer" else y))
    if facet:
        fig = with_traces(fig, traces, rows=[i // ncols + 1 for i in range(len(facets))],
                          cols=[i % ncols + 1 for i in range(len(facets))], **axes)
    else:
        fig = with_traces(fig, traces, **axes)
    vals = df[z].to_numpy(dtype=float)
    if zmid is not None:
        span = np.nanmax(np.abs(vals - zmid)) or 1.0
        zmin, zmax = zmid - span, zmid + span
    fig.update_layout(coloraxis=dict(colorscale=colorscale, cmin=zmin, cmax=zmax,
                                     colorbar=dict(title=dict(text=zlabel, side="right"), thickness=12)))
    if facet:
        mark_facets(fig, facet, len(facets), total)
    return fig


def difference_heatmap(df: pd.DataFrame, z: str, zlabel: str, title: str, x: str = "module",
                       y: str = "layer", text: bool = False) -> go.Figure:
    """Layer × module heatmap of a difference (B − A): diverging PuOr, centred on 0, symmetric range."""
    return heatmap(df, z, zlabel, title, x=x, y=y, facet=None, colorscale=DIVERGING, zmid=0.0, text=text,
                   fmt=".2g")


def _layer_dtick(n: int) -> int:
    return 1 if n <= 12 else 2 if n <= 24 else 4 if n <= 48 else 8


# --------------------------------------------------------------------------------------- line figures
def layerwise_lines(df: pd.DataFrame, y: str, ylabel: str, title: str, color: str = "module",
                    dash: str | None = None, facet: str | None = "run_id", log_y: bool = False) -> go.Figure:
    """``y`` by layer. Default: one panel per run, one colour per module (as in 2606.13657 Fig. 2);
    ``color="run_id", dash="module", facet=None`` overlays methods in one panel.

    Columns: layer, ``y``, and the columns named by color/dash/facet (run_id implies method)."""
    df = df[df["layer"].notna()] if "layer" in df else df
    if df.empty or y not in df or df[y].notna().sum() == 0:
        return empty_figure(title=title)
    return lines(df, "layer", y, color, title, "layer index", ylabel, dash=dash, facet=facet, log_y=log_y,
                 markers=df["layer"].nunique() <= 12, x_axis=integer_ticks(df["layer"]))


def integer_ticks(values) -> dict:
    """Axis properties for ticks only at whole numbers (layers, deciles, steps are integers): a step of
    1, 2, 4… chosen so that at most ~12 ticks show."""
    vals = pd.Series(values).dropna()
    span = float(vals.max() - vals.min()) if len(vals) else 0.0
    dtick = 1
    while span / dtick > 12:
        dtick *= 2
    return dict(tickmode="linear", tick0=float(vals.min()) if len(vals) else 0.0, dtick=dtick, tickformat="d")


def sweep(df: pd.DataFrame, title: str, mark_eps: float | None = 1e-5) -> go.Figure:
    """Sparsity (share of entries unchanged) against the threshold ε on abs(ΔW), log x.

    Columns: run_id, method, eps, sparsity (fraction); optional ``label`` (tensor) → dash."""
    if df.empty:
        return empty_figure(title=title)
    d = df.assign(sparsity_pct=100 * df["sparsity"])
    fig = lines(d, "eps", "sparsity_pct", "run_id", title, "threshold ε on |ΔW| (absolute, log scale)",
                 "entries unchanged, |ΔW| ≤ ε (%)", dash="label" if "label" in d else None, log_x=True,
                 markers=True)
    if mark_eps:
        fig.add_vline(x=mark_eps, line=dict(color=BASELINE_COLOR, dash="dot", width=1))
        # at the top: the curves sit low at small ε, where a label at the bottom would cover them
        fig.add_annotation(x=math.log10(mark_eps), y=0.98, yref="paper", text="ε = " + f"{mark_eps:.0e}".replace("e-0", "e-"), showarrow=False,
                           xanchor="left", yanchor="top", font=dict(size=10, color="#555555"))
    fig.update_yaxes(range=[0, 101])
    return fig


def decile_profile(df: pd.DataFrame, title: str) -> go.Figure:
    """Update density in each decile of abs(W_base), relative to the tensor's mean density (1 = uniform).

    Columns: run_id, method, decile (1 = smallest |W_base|), density (fraction changed), and
    ``relative`` (density / mean over deciles)."""
    if df.empty:
        return empty_figure(title=title)
    fig = lines(df, "decile", "relative", "run_id", title, "decile of |W<sub>base</sub>| (1 = smallest)",
                 "update density / mean density", markers=True, hover="density_label" if "density_label" in df else None)
    baseline(fig, [1, 10], [1, 1], "uniform (no magnitude preference)")
    fig.update_xaxes(tickvals=list(range(1, 11)))
    return fig


# --------------------------------------------------------------------------------------- bars, maps
def bars(df: pd.DataFrame, x: str, y: str, title: str, xlabel: str, ylabel: str, percent: bool = False,
         baseline: float | None = None, baseline_name: str = "random baseline") -> go.Figure:
    """Grouped bars of ``y`` per ``x``, one colour per run (method colour). Columns: run_id, method, x, y."""
    if df.empty or df[y].notna().sum() == 0:
        return empty_figure(title=title)
    styles = run_styles(df)
    fig = base_figure(title)
    xs = ordered(df[x], x)
    scale = 100 if percent else 1
    patterns = {"solid": "", "dash": "/", "dot": ".", "dashdot": "x", "longdash": "\\", "longdashdot": "+"}
    name_of = _namer(df, "run_id")
    parts = dict(iter(df.groupby("run_id", sort=False)))
    traces = []
    for run_id in ordered(df["run_id"], "run"):
        part = parts[run_id].set_index(x).reindex(xs)
        color, dash = styles[run_id]
        traces.append(dict(type="bar", x=[escape(v) for v in xs], y=scale * part[y].astype(float),
                           name=name_of(run_id), marker=dict(color=color, pattern=dict(
                               shape=patterns[dash], fgcolor="white", fillmode="overlay", solidity=0.35)),
                           hovertemplate=f"%{{x}}<br>{ylabel}: %{{y:.4g}}<extra>{escape(run_id)}</extra>"))
    fig = with_traces(fig, traces)
    if baseline is not None:
        fig.add_hline(y=scale * baseline, line=dict(color=BASELINE_COLOR, dash="dot", width=1.5))
        baseline(fig, [None], [None], baseline_name)
    fig.update_layout(barmode="group", bargap=0.25, bargroupgap=0.05)
    fig.update_xaxes(title_text=xlabel, type="category", showgrid=False)
    # a bar's length is its value: the axis always starts at 0 (negative values extend below it)
    fig.update_yaxes(title_text=ylabel, rangemode="tozero")
    return fig


def energy_shares(df: pd.DataFrame, title: str, group: str = "module") -> go.Figure:
    """Share of the run's ‖ΔW‖²_F per module (or block), bars per method.
    Columns: run_id, method, ``group``, energy_share (fraction)."""
    if not df.empty:
        df = df.assign(**{group: df[group].astype(str)})
        order = sorted(df[group].unique(), key=module_sort_key)
        df = df.set_index(group).loc[order].reset_index()
    return bars(df, group, "energy_share", title, group, "share of the run's ‖ΔW‖²<sub>F</sub> (%)", percent=True)


def sparsity_map(image: np.ndarray | None, row_frac: np.ndarray | None, col_frac: np.ndarray | None,
                 title: str, shape: tuple[int, int] | None = None) -> go.Figure:
    """Where a matrix changed: a block-averaged image of the changed mask (share of entries changed per
    block) with the per-row and per-column changed fractions as marginals. ``shape`` is the matrix
    shape (rows, cols) so axes read in matrix coordinates."""
    if image is None or np.size(image) == 0:
        return empty_figure(title=title)
    image = np.atleast_2d(np.asarray(image, dtype=float))
    rows, cols = shape or (len(row_frac) if row_frac is not None else image.shape[0],
                           len(col_frac) if col_frac is not None else image.shape[1])
    fig = base_figure(title, 2, 2, column_widths=[0.8, 0.2], row_heights=[0.22, 0.78], shared_xaxes=True,
                  shared_yaxes=True, horizontal_spacing=0.02, vertical_spacing=0.02)
    dy, dx = rows / image.shape[0], cols / image.shape[1]
    fig.add_trace(go.Heatmap(z=100 * image, x0=dx / 2, dx=dx, y0=dy / 2, dy=dy, coloraxis="coloraxis",
                             hovertemplate="rows ≈ %{y:.0f}<br>cols ≈ %{x:.0f}<br>changed: %{z:.2f}%<extra></extra>"),
                  row=2, col=1)
    if col_frac is not None:
        fig.add_trace(go.Scatter(x=np.arange(len(col_frac)), y=100 * np.asarray(col_frac), mode="lines",
                                 line=dict(color="#333333", width=0.8), name="per column", showlegend=False,
                                 hovertemplate="col %{x}: %{y:.2f}%<extra></extra>"), row=1, col=1)
    if row_frac is not None:
        fig.add_trace(go.Scatter(y=np.arange(len(row_frac)), x=100 * np.asarray(row_frac), mode="lines",
                                 line=dict(color="#333333", width=0.8), name="per row", showlegend=False,
                                 hovertemplate="row %{y}: %{x:.2f}%<extra></extra>"), row=2, col=2)
    # the colour bar lies flat in the empty top-right cell, clear of the per-row panel and its axis
    fig.update_layout(coloraxis=dict(colorscale=SEQUENTIAL, cmin=0,
                                     colorbar=dict(title=dict(text="changed (%)", side="top"), orientation="h",
                                                   x=0.9, xanchor="center", len=0.19, y=0.9, yanchor="middle",
                                                   thickness=10, nticks=3)))
    fig.update_yaxes(autorange="reversed", row=2, col=1, title_text="output row i")
    fig.update_yaxes(autorange="reversed", row=2, col=2)
    fig.update_xaxes(title_text="input column j", row=2, col=1, range=[0, cols])
    fig.update_yaxes(title_text="changed (%)", row=1, col=1, rangemode="tozero")
    fig.update_xaxes(title_text="changed (%)", row=2, col=2, rangemode="tozero", nticks=3)
    fig.update_xaxes(showgrid=False)
    fig.update_yaxes(showgrid=False)
    fig.update_yaxes(range=[rows, 0], row=2, col=1)
    fig.update_xaxes(visible=False, row=1, col=2)
    fig.update_yaxes(visible=False, row=1, col=2)
    return fig
