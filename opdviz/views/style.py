"""How every opdviz figure looks: colours, fonts, the Plotly template, the base figure, and the paper style.

Colours: one fixed Okabe–Ito colour per method (``method_color``) wherever a method appears, a separate
colour-blind-safe palette (Paul Tol's "muted") for modules, so a module is never mistaken for a method.
Sequential maps are Cividis, diverging maps PuOr centred on 0. ``paper_style`` sizes a figure for a single
(3.5 in) or double (7 in) column with 8-pt text; ``opdviz.views.export`` applies it before writing PDF/SVG/PNG.
"""

from __future__ import annotations

import functools
import hashlib
import math
import pickle
import re

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from opdviz.views.formatting import escape

# --------------------------------------------------------------------------------------- colours
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9", "bluish_green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish_purple": "#CC79A7"}
METHOD_COLORS = {"OPD": OKABE_ITO["blue"], "RL": OKABE_ITO["vermillion"], "GRPO": OKABE_ITO["reddish_purple"],
                 "SFT": OKABE_ITO["bluish_green"], "DPO": OKABE_ITO["orange"], "BASE": OKABE_ITO["black"]}
# other labels hash into colours still distinguishable under deuteranopia/protanopia (Okabe–Ito rest + Tol)
_EXTRA_COLORS = (OKABE_ITO["sky_blue"], "#B8A000", "#882255", "#44AA99", "#332288", "#999933", "#777777")
MODULE_COLORS = {"q": "#332288", "k": "#88CCEE", "v": "#44AA99", "o": "#117733", "gate": "#999933",
                 "up": "#DDCC77", "down": "#CC6677", "qkv": "#882255", "gate_up": "#AA4499",
                 "embed": "#555555", "lm_head": "#000000", "norm": "#BBBBBB"}
MODULE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "embed", "lm_head", "norm")
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
SEQUENTIAL = "Cividis"
DIVERGING = "PuOr"
BASELINE_COLOR = "#7F7F7F"
FONT = "Arial, 'Liberation Sans', Helvetica, sans-serif"

# Chromium prints 96 CSS px per inch; 8 pt = 10.7 px. Widths of a two-column paper: 3.5 in and 7 in.
PAPER_WIDTH_PX = {"single": 336, "double": 672}
PAPER_FONT_PX = {"single": 11, "double": 12}


def method_color(method: str | None) -> str:
    """The colour of a method label: fixed for OPD/RL/GRPO/SFT/DPO/base (case-insensitive), else a
    stable hash of the label (the same in every process and on every page)."""
    label = (method or "").strip()
    if label.upper() in METHOD_COLORS:
        return METHOD_COLORS[label.upper()]
    digest = int(hashlib.sha1(label.encode()).hexdigest()[:8], 16)
    return _EXTRA_COLORS[digest % len(_EXTRA_COLORS)]


def module_color(module: str | None) -> str:
    if module in MODULE_COLORS:
        return MODULE_COLORS[module]
    digest = int(hashlib.sha1(str(module).encode()).hexdigest()[:8], 16)
    return _EXTRA_COLORS[digest % len(_EXTRA_COLORS)]


def run_styles(runs: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """run_id → (colour, dash): colour from the run's method; runs sharing a method differ by dash (``run_shades``
    where dashes draw something else).

    ``runs`` needs columns run_id and method (extra rows are ignored)."""
    styles, seen = {}, {}
    for run_id, method in runs[["run_id", "method"]].drop_duplicates("run_id").itertuples(index=False):
        n = seen.get(method, 0)
        seen[method] = n + 1
        styles[run_id] = (method_color(method), DASHES[n % len(DASHES)])
    return styles


# colour shades of the 2nd, 3rd, … run of one method where dashes draw something else: mixed with black (< 0)
# or white (> 0) by that share; the first run keeps its method's colour
_SHADES = (0.0, -0.4, 0.4, -0.6, 0.6, -0.2, 0.2, -0.75, 0.75)


def shade(color: str, t: float) -> str:
    """``color`` (#rrggbb) mixed with black (t < 0) or white (t > 0) by the share abs(t)."""
    rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    target = 0 if t < 0 else 255
    return "#" + "".join(f"{round(c + (target - c) * abs(t)):02X}" for c in rgb)


def run_shades(styles: dict[str, tuple[str, str]]) -> dict[str, str]:
    """run_id → colour for figures whose dashes draw something else (a tensor, a side): runs sharing a method
    (same colour in ``run_styles``) get darker and lighter shades of it in turn, so they stay apart."""
    seen: dict[str, int] = {}
    out = {}
    for run_id, (color, _) in styles.items():
        n = seen.get(color, 0)
        seen[color] = n + 1
        out[run_id] = shade(color, _SHADES[n % len(_SHADES)]) if n else color
    return out


def run_label(run_id: str, method: str | None) -> str:
    """Legend/facet label of a run, escaped (run names and method labels are untrusted text)."""
    text = run_id if not method or str(method) == str(run_id) else f"{run_id} ({method})"
    return escape(text)


def module_sort_key(module) -> tuple:
    return (MODULE_ORDER.index(module) if module in MODULE_ORDER else len(MODULE_ORDER), str(module))


# --------------------------------------------------------------------------------------- base layout
def _template() -> go.layout.Template:
    # automargin: long category labels (tensor, criterion names) push the margin out instead of being clipped
    axis = dict(showline=True, linecolor="black", linewidth=1, ticks="outside", ticklen=3, mirror=False,
                showgrid=True, gridcolor="#E5E5E5", gridwidth=0.5, zeroline=False, title_standoff=4, automargin=True)
    return go.layout.Template(layout=dict(
        font=dict(family=FONT, size=13, color="black"), paper_bgcolor="white", plot_bgcolor="white",
        xaxis=axis, yaxis=axis, colorway=list(METHOD_COLORS.values()),
        legend=dict(bgcolor="rgba(255,255,255,0.8)", borderwidth=0, tracegroupgap=2),
        margin=dict(l=60, r=20, t=50, b=50), hoverlabel=dict(namelength=-1)))


_TEMPLATE = _template()


def base_figure(title: str, rows: int = 1, cols: int = 1, **subplot_kw) -> go.Figure:
    """An empty figure in the opdviz template, titled ``title``, with a ``rows`` × ``cols`` grid of panels.

    The template is built once (the figure copies it), and the layout set when the figure is made, without
    Plotly's validation (opdviz's own layouts; see ``with_traces``: 2 → 0.25 ms a figure). A grid's
    layout is Plotly's ``make_subplots`` for that shape, made once per shape and process (``_grid``: the
    geometry only, its panel titles placeholders filled in here) — the same figure at a fifth of the cost."""
    layout = dict(template=_TEMPLATE, title=dict(text=title, x=0, xanchor="left"),
                  meta={"panels": rows * cols, "rows": rows})
    if rows * cols == 1 and not subplot_kw:
        return _unvalidated(layout=layout)
    kw = dict(subplot_kw)
    titles = list(kw.pop("subplot_titles", None) or [])
    key = _frozen(kw)
    if key is None:                          # arguments we cannot key on (never in opdviz's own figures)
        fig = go.Figure(layout=layout)
        make_subplots(rows=rows, cols=cols, figure=fig, subplot_titles=titles or None, **kw)
        return fig
    layout_bytes, ref_bytes, grid_str = _grid(rows, cols, len(titles), key)
    grid, ref = pickle.loads(layout_bytes), pickle.loads(ref_bytes)
    text = {_placeholder(i): t for i, t in enumerate(titles)}
    if "annotations" in grid:                # make_subplots leaves out the annotation of an empty title
        grid["annotations"] = [{**a, "text": text[a["text"]]} if a.get("text") in text else a
                               for a in grid["annotations"] if not (a.get("text") in text and not text[a["text"]])]
    fig = _unvalidated(layout={**grid, **layout})
    fig.__dict__["_grid_ref"] = ref          # what add_trace(row=, col=) and get_subplot read
    fig.__dict__["_grid_str"] = grid_str
    return fig


def _unvalidated(**parts) -> go.Figure:
    """``go.Figure(**parts)`` without Plotly's validation of every value (see ``with_traces``), here and in
    the figure's later updates (property names are still checked); a Plotly without that switch validates."""
    try:
        return go.Figure(**parts, _validate=False)
    except TypeError:
        return go.Figure(**parts)


def with_traces(fig: go.Figure, traces: list[dict], rows: list[int] | None = None,
                cols: list[int] | None = None, x: dict | None = None, y: dict | None = None,
                axes: dict[str, dict] | None = None) -> go.Figure:
    """``fig`` (a ``base_figure``) with ``traces`` (plain dicts) added, trace i in panel (rows[i], cols[i]) of
    its grid (None: no panel, as ``add_traces`` without one), ``x`` and ``y`` (nested dicts) merged into every
    x and y axis as ``update_xaxes``/``update_yaxes`` would, and ``axes`` (layout key → nested dict, e.g.
    ``{"xaxis3": {"title": {"text": …}}}``) into the axes named; a new figure, made at once.

    Plotly's ``add_traces`` validates every property of every trace (measured ≈ 0.8 ms a trace: a grid of
    12 runs' panels has about 90 traces, 80 ms); these dicts are opdviz's own, so the figure is made from
    them the way Plotly makes its templates, without that validation (4× faster). The test suite
    revalidates every figure of every page (``tests/figcheck.py``)."""
    grid = getattr(fig, "_grid_ref", None)
    # pandas columns as numpy arrays, as validation leaves them (a Series keeps its index: t.x[0] by label)
    traces = [{k: v.to_numpy() if isinstance(v, (pd.Series, pd.Index)) else v for k, v in t.items()}
              for t in traces]
    if rows is not None:
        traces = [t if r is None else {**t, **grid[r - 1][c - 1][0].trace_kwargs}
                  for t, r, c in zip(traces, rows, cols)]
    # the layout as a dict (a copy): half the time of copying the Layout object. Axis properties go into it
    # before the figure is made: update_xaxes walks Plotly's relayout machinery (26 ms on a 12-panel figure
    # of 90 traces, against 7 ms to make the whole figure)
    layout = fig.layout.to_plotly_json()
    for prefix, props in (("xaxis", x), ("yaxis", y)):
        if props:
            for key in [k for k in layout if re.fullmatch(prefix + r"\d*", k)] or [prefix]:
                layout[key] = _merged(layout.get(key) or {}, props)
    for key, props in (axes or {}).items():
        layout[key] = _merged(layout.get(key) or {}, props)
    out = _unvalidated(data=[*fig.data, *traces], layout=layout)
    out.__dict__["_grid_ref"] = grid         # what add_trace(row=, col=) and get_subplot read
    out.__dict__["_grid_str"] = getattr(fig, "_grid_str", None)
    return out


def _merged(base: dict, props: dict) -> dict:
    """A copy of ``base`` with the nested dict ``props`` merged into it (``props`` wins)."""
    out = dict(base)
    for k, v in props.items():
        out[k] = _merged(out.get(k) if isinstance(out.get(k), dict) else {}, v) if isinstance(v, dict) else v
    return out


def _placeholder(i: int) -> str:
    return f"\x00{i}\x00"


@functools.lru_cache(maxsize=128)
def _grid(rows: int, cols: int, n_titles: int, kw: tuple) -> tuple[bytes, bytes, str]:
    """``make_subplots``' layout of a rows × cols grid with ``n_titles`` placeholder panel titles, its grid
    reference and grid map: pure geometry (no data), kept per shape. The layout and reference are pickled:
    each figure unpickles its own copy (a 4 × 3 grid: 0.08 ms, against 0.5 ms for a deep copy)."""
    titles = [_placeholder(i) for i in range(n_titles)] if n_titles else None
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, **dict(kw))
    return pickle.dumps(fig.layout.to_plotly_json()), pickle.dumps(fig._grid_ref), fig._grid_str


def _frozen(kw: dict) -> tuple | None:
    """``make_subplots`` keyword arguments as a hashable key (lists as tuples), or None if they cannot be."""
    items = []
    for k, v in sorted(kw.items()):
        v = tuple(v) if isinstance(v, list) else v
        try:
            hash(v)
        except TypeError:
            return None
        items.append((k, v))
    return tuple(items)


# --------------------------------------------------------------------------------------- paper style
def _slanted_labels_px(fig: go.Figure, fs: int) -> int:
    """Extra bottom margin for slanted category labels: Kaleido's automargin does not make room for the
    axis title under them, so reserve their drawn height (longest label × glyph width × sin angle)."""
    angle = fig.layout.xaxis.tickangle if fig.layout.xaxis.tickangle is not None else 0
    if not angle:
        return 0
    longest = max((len(str(v)) for t in fig.data if t.type in ("bar", "heatmap") and t.x is not None
                   for v in t.x), default=0)
    return int(longest * (fs - 1) * 0.55 * abs(math.sin(math.radians(float(angle)))))


def paper_style(fig: go.Figure, width: str = "single", height: int | None = None) -> go.Figure:
    """Size ``fig`` for a paper column: ``single`` 3.5 in, ``double`` 7 in wide (96 px/in as
    Chromium prints), 8–9 pt text, no title (the caption goes in the paper), legend above the plot.
    Returns a new figure; the input is left as it is."""
    if width not in PAPER_WIDTH_PX:
        raise ValueError(f"width must be 'single' or 'double', not {width!r}")
    out = go.Figure(fig)
    w, fs = PAPER_WIDTH_PX[width], PAPER_FONT_PX[width]
    meta = out.layout.meta if isinstance(out.layout.meta, dict) else {}
    rows = int(meta.get("rows", 1) or 1)
    h = height or int((0.72 if width == "single" else 0.42) * w * (1 + 0.6 * (rows - 1)))
    names = [str(t.name) for t in out.data if t.showlegend is not False and t.name]
    # legend above the plot, entries wrapped to rows as plotly does; estimate the rows to reserve room
    rows_needed, used = (1, 0) if names else (0, 0)
    for n in names:
        item = int(len(n) * (fs - 1) * 0.58) + 46                     # text + symbol + gaps, px
        if used and used + item > w - 10:
            rows_needed, used = rows_needed + 1, 0
        used += item
    legend_h = int(1.6 * fs) * rows_needed
    titled = any(a.yref == "paper" and (a.y or 0) >= 1 for a in out.layout.annotations)   # subplot titles
    bottom = 54 + _slanted_labels_px(out, fs)
    top = 8 + legend_h + (fs + 6 if titled else 0)
    out.update_layout(
        width=w, height=h + top, title=None, font=dict(family=FONT, size=fs, color="black"),
        margin=dict(l=48, r=8, t=top, b=bottom), showlegend=bool(names),   # b: ticks + labels + axis title
        legend=dict(orientation="h", x=0, xanchor="left", y=0.995, yanchor="top", yref="container",
                    font=dict(size=fs - 1), itemwidth=30, tracegroupgap=0),
    )
    out.update_annotations(font_size=fs)
    out.update_xaxes(tickfont_size=fs - 1, title_font_size=fs, title_standoff=2, ticklen=2, automargin=True)
    out.update_yaxes(tickfont_size=fs - 1, title_font_size=fs, title_standoff=2, ticklen=2, automargin=True)
    if out.layout.coloraxis and out.layout.coloraxis.colorbar:
        out.update_layout(coloraxis_colorbar=dict(thickness=8, tickfont_size=fs - 1, title_font_size=fs,
                                                  xpad=2))
    out.update_traces(line_width=1.2, selector=dict(type="scatter"))
    out.update_traces(textfont_size=max(6, fs - 3), selector=dict(type="heatmap"))
    return out
