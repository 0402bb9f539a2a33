"""Figure builders as plain functions: traces, axis titles with units, colours, baselines, log axes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from opdviz.views import figures as F
from opdviz.views import figures_spectral as FS
from opdviz.views import style


RUNS = pd.DataFrame({"run_id": ["opd-a", "rl-a", "sft-a"], "method": ["OPD", "RL", "SFT"]})


def _by_layer(values=(0.7, 0.8, 0.2)) -> pd.DataFrame:
    rows = []
    for (run_id, method), base in zip(RUNS.itertuples(index=False), values):
        for layer in range(3):
            for module in ("down", "q", "k"):
                rows.append({"run_id": run_id, "method": method, "layer": layer, "module": module,
                             "value": base + 0.01 * layer})
    return pd.DataFrame(rows)


def _curves(x: str, y: str, xs, f, **extra) -> pd.DataFrame:
    return pd.DataFrame([{"run_id": r, "method": m, x: v, y: f(v, i), **extra}
                         for i, (r, m) in enumerate(RUNS.itertuples(index=False)) for v in xs])


def _colors(fig: go.Figure) -> dict[str, str]:
    """Legend name → colour of the traces shown in the legend (lines or bars)."""
    out = {}
    for t in fig.data:
        if t.showlegend is False or not t.name:
            continue
        color = t.marker.color if t.type == "bar" else t.line.color
        out[t.name.split(" ")[0]] = color
    return out


def _titled(fig: go.Figure) -> None:
    """Every visible axis that carries ticks has a title, and each title names its unit."""
    layout = fig.to_plotly_json()["layout"]
    titles = [v.get("title", {}).get("text") for k, v in layout.items() if k.startswith(("xaxis", "yaxis"))
              and v.get("visible", True)]
    assert any(titles), "no axis titles"
    for t in filter(None, titles):
        assert any(u in t for u in ("(", "index", "module", "when", "layer")), f"axis title without unit: {t!r}"


# ------------------------------------------------------------------------ colours
def test_method_colours_fixed_and_colour_blind_safe():
    assert style.method_color("OPD") == style.OKABE_ITO["blue"] == style.method_color("opd")
    assert style.method_color("RL") == style.OKABE_ITO["vermillion"]
    assert style.method_color("SFT") == style.OKABE_ITO["bluish_green"]
    assert len({style.method_color(m) for m in ("OPD", "RL", "GRPO", "SFT", "DPO", "base")}) == 6
    # other labels hash stably (sha1, not Python's salted hash)
    assert style.method_color("my-method") == style.method_color("my-method")
    assert style.method_color("my-method") in style._EXTRA_COLORS


def test_runs_sharing_a_method_differ_by_dash():
    styles = style.run_styles(pd.DataFrame({"run_id": ["a", "b", "c"], "method": ["OPD", "OPD", "RL"]}))
    assert styles["a"][0] == styles["b"][0] == style.method_color("OPD")
    assert styles["a"][1] != styles["b"][1]


def test_method_colour_same_across_figures():
    lines = F.layerwise_lines(_by_layer(), "value", "entries unchanged (%)", "t", color="run_id", dash="module",
                              facet=None)
    bars = F.bars(_by_layer().query("layer == 0"), "module", "value", "t", "module", "entries unchanged (%)")
    cov = FS.coverage(_curves("alpha", "coverage", [0.01, 0.1, 0.5], lambda a, i: a * (1.5 - 0.2 * i),
                             kind="low-magnitude"), "t")
    for fig in (lines, bars, cov):
        colors = _colors(fig)
        assert colors["opd-a"] == style.method_color("OPD") and colors["rl-a"] == style.method_color("RL")


# ------------------------------------------------------------------------ heatmaps
def test_heatmap_one_panel_per_run_shared_sequential_scale():
    fig = F.heatmap(_by_layer(), "value", "entries unchanged (%)", "t")
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 3 and {t.coloraxis for t in heat} == {"coloraxis"}
    assert fig.layout.coloraxis.colorscale[0][1] != fig.layout.coloraxis.colorscale[-1][1]
    assert list(heat[0].x) == ["q", "k", "down"]           # canonical module order
    assert [a.text for a in fig.layout.annotations] == ["opd-a (OPD)", "rl-a (RL)", "sft-a (SFT)"]
    assert fig.layout.coloraxis.colorbar.title.text == "entries unchanged (%)"
    _titled(fig)


def test_heatmap_text_in_cells_optional():
    assert F.heatmap(_by_layer(), "value", "u (%)", "t", text=True).data[0].texttemplate
    assert not F.heatmap(_by_layer(), "value", "u (%)", "t").data[0].texttemplate


def test_difference_heatmap_diverging_centred_on_zero():
    df = _by_layer().query("run_id == 'opd-a'").assign(diff=lambda d: d["value"] - 0.75)
    fig = F.difference_heatmap(df, "diff", "Δ entries unchanged (%)", "B − A")
    ca = fig.layout.coloraxis
    assert ca.cmin == pytest.approx(-ca.cmax) and ca.cmax > 0
    assert [c[1] for c in ca.colorscale] == [c[1] for c in go.layout.Coloraxis(colorscale="PuOr").colorscale]


# ------------------------------------------------------------------------ lines
def test_layerwise_lines_colour_per_module_dash_per_method():
    fig = F.layerwise_lines(_by_layer(), "value", "entries unchanged (%)", "t", color="module", dash="run_id",
                            facet=None)
    data = [t for t in fig.data if t.showlegend is False]
    assert len(data) == 9
    q = [t for t in data if t.name.startswith("q ·")]
    assert {t.line.color for t in q} == {style.MODULE_COLORS["q"]} and len({t.line.dash for t in q}) == 3
    _titled(fig)


def test_sweep_log_x_and_criterion_marker():
    eps = 10.0 ** np.arange(-10, -0.5, 0.5)
    fig = F.sweep(_curves("eps", "sparsity", eps, lambda e, i: min(1, 0.3 + 0.05 * np.log10(e) + 0.6)), "t")
    assert fig.layout.xaxis.type == "log"
    assert any(s.type == "line" for s in fig.layout.shapes)
    _titled(fig)


def test_spectra_normalised_log_log():
    df = _curves("index", "sigma", range(1, 101), lambda i, r: 5.0 * i ** -(0.5 + 0.3 * r), label="L1 q")
    fig = FS.spectra(df, "t")
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    lines = [t for t in fig.data if t.showlegend is False]
    assert all(max(t.y) == pytest.approx(1.0) for t in lines)          # σ/σ₁
    assert "σ₁" in fig.layout.yaxis.title.text


def test_spectra_thin_long_curves():
    df = _curves("index", "sigma", range(1, 4097), lambda i, r: 1.0 / i, label="L1 q")
    assert all(len(t.x) <= 300 for t in FS.spectra(df, "t").data if t.showlegend is False)


def test_cumulative_energy_reaches_100():
    df = _curves("index", "sigma", range(1, 65), lambda i, r: 1.0 / i, label="L1 q")
    lines = [t for t in FS.cumulative_energy(df, "t").data if t.showlegend is False]
    assert all(t.y[-1] == pytest.approx(100) for t in lines)


def test_principal_projection_has_random_baselines():
    r = np.geomspace(0.01, 1, 10)
    df = pd.concat([_curves("rank_frac", "share", r, lambda x, i: x ** 1.3, kind=k) for k in ("joint", "left")])
    fig = FS.principal_projection(df, "t")
    base = [t for t in fig.data if (t.meta or {}).get("baseline")]
    assert {t.name for t in base} == {"random, one side (r)", "random, joint (r²)"}
    joint = next(t for t in base if "joint" in t.name)
    assert joint.y[-1] == pytest.approx(100) and joint.y[0] == pytest.approx(100 * (joint.x[0] / 100) ** 2)


def test_coverage_baseline_y_equals_alpha_in_each_panel():
    df = pd.concat([_curves("alpha", "coverage", [0.01, 0.1, 0.5], lambda a, i: a * 1.4, kind=k)
                    for k in ("low-magnitude", "principal")])
    fig = FS.coverage(df, "t")
    base = [t for t in fig.data if (t.meta or {}).get("baseline")]
    assert len(base) == 2 and all(list(t.x) == list(t.y) for t in base)
    _titled(fig)


def test_angles_in_degrees():
    df = _curves("index", "angle_deg", range(1, 17), lambda i, r: 0.5 * i, label="L1 q · left k=16")
    fig = FS.principal_angles(df, "t")
    assert "degrees" in fig.layout.yaxis.title.text


def test_sparsity_map_with_marginals():
    rng = np.random.default_rng(0)
    fig = F.sparsity_map(rng.random((32, 16)), rng.random(256), rng.random(128), "t", shape=(256, 128))
    assert [t.type for t in fig.data] == ["heatmap", "scatter", "scatter"]
    assert fig.layout.coloraxis.colorbar.title.text == "changed (%)" and fig.layout.coloraxis.colorbar.orientation == "h"
    assert fig.layout.yaxis3.title.text == "output row i"


def test_energy_shares_bars_per_method():
    df = _by_layer().query("layer == 0").rename(columns={"value": "energy_share"})
    fig = F.energy_shares(df, "t")
    assert [t.type for t in fig.data] == ["bar"] * 3 and fig.layout.barmode == "group"
    assert "%" in fig.layout.yaxis.title.text


@pytest.mark.parametrize("build", [
    lambda e: F.heatmap(e, "value", "u", "t"), lambda e: F.layerwise_lines(e, "value", "u", "t"),
    lambda e: F.sweep(e, "t"), lambda e: FS.spectra(e, "t"), lambda e: FS.coverage(e, "t"),
    lambda e: F.bars(e.assign(x=[]), "x", "value", "t", "x", "u"), lambda e: F.sparsity_map(None, None, None, "t")])
def test_empty_input_gives_annotated_figure(build):
    empty = pd.DataFrame(columns=["run_id", "method", "layer", "module", "value"])
    fig = build(empty)
    assert F.NO_DATA in fig.layout.annotations[0].text


@pytest.mark.parametrize("width,px", [("single", 336), ("double", 672)])   # 3.5 in and 7 in at 96 px/in
def test_paper_style_sizes_and_fonts(width, px):
    fig = style.paper_style(F.heatmap(_by_layer(), "value", "u (%)", "title"), width)
    assert fig.layout.width == px and 10 <= fig.layout.font.size <= 12     # 8–9 pt at 96 px/in
    assert fig.layout.title.text is None
    with pytest.raises(ValueError):
        style.paper_style(fig, "triple")


def test_cumulative_energy_of_truncated_spectrum_uses_exact_norm():
    df = _curves("index", "sigma", range(1, 9), lambda i, r: 1.0, label="L1 q").assign(delta_sq_sum=16.0)
    lines = [t for t in FS.cumulative_energy(df, "t").data if t.showlegend is False]
    assert all(t.y[-1] == pytest.approx(50) for t in lines)        # 8 of 16 units of ‖ΔW‖²_F


def test_a_facet_grid_of_a_50_run_sweep_draws_12_panels_spread_evenly_and_says_so():
    """50 runs would be 17 rows of panels: the grid draws MAX_PANELS of them (first and last included, in
    order), its meta says how many of how many, and ``facet_note`` turns that into the sentence under it."""
    import pandas as pd

    from opdviz.views import facets, figures

    runs = [f"r{i:02d}" for i in range(50)]
    df = pd.DataFrame({"run_id": [r for r in runs for _ in range(2)], "method": ["OPD"] * 100,
                       "x": [1, 2] * 50, "y": [0.1, 0.2] * 50, "layer": [0, 1] * 50, "module": ["q"] * 100})
    for fig in (figures.lines(df, "x", "y", "module", "t", "x", "y", facet="run_id"),
                figures.heatmap(df, "y", "u", "t")):
        titles = [a.text for a in fig.layout.annotations]           # the panel titles
        shown = sorted({t.split(" ")[0] for t in titles if t and t.startswith("r")})
        assert len(shown) == facets.MAX_PANELS == 12 and shown[0] == "r00" and shown[-1] == "r49"
        gaps = np.diff([int(r[1:]) for r in shown])
        assert gaps.min() >= 4 and gaps.max() <= 5                 # spread evenly over the 50
        assert fig.layout.meta["facets_shown"] == 12 and fig.layout.meta["facets_total"] == 50
        assert "12 of the 50 runs" in facets.facet_note(fig)
    # up to MAX_PANELS runs: every panel, no note
    few = df[df["run_id"].isin(runs[:12])]
    fig = figures.lines(few, "x", "y", "module", "t", "x", "y", facet="run_id")
    assert fig.layout.meta["facets_shown"] == 12 and facets.facet_note(fig) is None


def test_drawn_runs_keeps_every_run_up_to_the_cap_then_spreads_and_keeps_run_a_and_b():
    from opdviz.views.facets import MAX_PANELS, drawn_runs

    runs = [f"r{i:02d}" for i in range(50)]
    assert drawn_runs(runs[:MAX_PANELS]) == runs[:MAX_PANELS]
    picked = drawn_runs(runs)
    assert len(picked) == MAX_PANELS and picked[0] == "r00" and picked[-1] == "r49" and picked == sorted(picked)
    kept = drawn_runs(runs, keep=("r07", "r33", "nope"))
    assert len(kept) == MAX_PANELS and {"r07", "r33"} <= set(kept) and kept == sorted(kept)
    assert drawn_runs(runs[:13]) == [r for r in runs[:13] if r in drawn_runs(runs[:13])] and \
        len(drawn_runs(runs[:13])) == MAX_PANELS


def test_second_run_of_a_method_keeps_a_filled_bar():
    """Two runs of one method share its colour; the second is hatched *over* its colour, never an empty
    outline (a white pattern on a transparent fill made its bars invisible on the page)."""
    df = pd.DataFrame({"run_id": ["a", "a", "b", "b"], "method": ["OPD"] * 4, "module": ["q", "k", "q", "k"],
                       "energy_share": [0.4, 0.6, 0.5, 0.5]})
    fig = F.energy_shares(df, "t")
    first, second = fig.data
    assert first.marker.color == second.marker.color
    assert second.marker.pattern.shape and second.marker.pattern.fillmode == "overlay"


@pytest.mark.parametrize("rows,cols,kw", [
    (1, 3, dict(shared_yaxes=True, shared_xaxes=True, subplot_titles=["OPD", "r&lt;1 (RL)", "SFT"],
                horizontal_spacing=0.04, vertical_spacing=0.12)),
    (4, 3, dict(shared_yaxes=True, subplot_titles=[f"r{i}" for i in range(11)], vertical_spacing=0.05)),
    (2, 2, dict(subplot_titles=["a", "", None, "d"])),
    (1, 2, dict(specs=[[{}, {}]], column_widths=[0.8, 0.2])),     # not hashable: make_subplots directly
    (2, 1, {}),
])
def test_a_grid_from_the_shape_cache_is_the_figure_make_subplots_makes(rows, cols, kw):
    """base_figure keeps make_subplots' layout per grid shape and fills in the panel titles: the figure, and
    what add_trace(row=, col=), update_xaxes(row=) and get_subplot do with it, equal make_subplots' own."""
    from plotly.subplots import make_subplots

    for _ in range(2):                                   # the first call fills the cache, the second reads it
        mine = style.base_figure("T", rows, cols, **kw)
        ref = make_subplots(rows=rows, cols=cols, **kw)
        ref.update_layout(template=style._template(), title=dict(text="T", x=0, xanchor="left"),
                          meta={"panels": rows * cols, "rows": rows})
        for fig in (mine, ref):
            fig.add_trace(go.Scatter(x=[1], y=[2]), row=rows, col=cols)
            fig.add_traces([dict(type="scatter", x=[1], y=[3])], rows=[1], cols=[1])
            fig.update_xaxes(title_text="x", row=rows, col=1)
            fig.get_subplot(1, 1).yaxis.update(title_text="y")
        assert json.loads(mine.to_json()) == json.loads(ref.to_json())


@pytest.mark.parametrize("rows,cols,kw", [
    (4, 3, dict(shared_yaxes=True, shared_xaxes=True, subplot_titles=[f"r{i}" for i in range(12)],
                vertical_spacing=0.05)),
    (1, 1, {}),
])
def test_traces_added_unvalidated_make_the_figure_add_traces_makes(rows, cols, kw):
    """with_traces makes, without Plotly's validation, the figure add_traces makes: the same traces in the
    same panels (None: no panel), numpy data included, and later updates and placements still work."""
    def traces():
        return [dict(type="scatter", x=np.arange(3.0), y=np.array([1.0, 2.0, float(i)]), name=f"t{i}",
                     mode="lines", line=dict(color="#123456", dash="dot", width=1.8), showlegend=False,
                     hovertemplate="%{x}<extra></extra>") for i in range(rows * cols)] + \
               [dict(type="scatter", x=[None], y=[None], mode="lines", name="key", showlegend=True)]
    grid = [(i // cols + 1, i % cols + 1) for i in range(rows * cols)]
    r = [g[0] for g in grid] + [None]
    c = [g[1] for g in grid] + [None]
    ref = style.base_figure("T", rows, cols, **kw) if kw else style.base_figure("T")
    if kw:
        ref.add_traces(traces()[:-1], rows=r[:-1], cols=c[:-1])
    else:
        ref.add_traces(traces()[:-1])
    ref.add_traces(traces()[-1:])
    mine = style.with_traces(style.base_figure("T", rows, cols, **kw) if kw else style.base_figure("T"), traces(),
                             r if kw else None, c if kw else None)
    assert json.loads(mine.to_json()) == json.loads(ref.to_json())
    series = dict(type="bar", x=pd.Index(["q", "k"]), y=pd.Series([1.0, 2.0], index=["q", "k"]))
    mine, ref = style.with_traces(mine, [series]), go.Figure(ref).add_traces([series])
    assert mine.data[-1].y[0] == ref.data[-1].y[0] == 1.0 and list(mine.data[-1].x) == ["q", "k"]
    for fig in (mine, ref):
        fig.update_xaxes(type="log")
        fig.add_trace(go.Scatter(x=[1], y=[2]), **(dict(row=rows, col=cols) if kw else {}))
    assert json.loads(mine.to_json()) == json.loads(ref.to_json())


def test_an_invalid_trace_added_unvalidated_is_caught_by_the_validity_check():
    """What with_traces skips, the suite's check (remaking a figure through a validating Figure) catches."""
    fig = style.with_traces(style.base_figure("T"), [dict(type="scatter", x=[1], y=[2], linee=dict(width=1))])
    with pytest.raises(ValueError, match="linee"):
        go.Figure(fig.to_dict())


def test_runs_of_one_method_differ_by_shade_where_dashes_draw_something_else():
    """With dash keyed to another column (a tensor, a side), two runs of one method cannot differ by dash:
    the first keeps the method's colour, the next get darker and lighter shades of it; with one run a
    method, or dashes free for the runs, the colours are the methods' own."""
    rows = [{"run_id": r, "method": m, "x": x, "y": x + i, "label": lab}
            for i, (r, m) in enumerate((("opd-a", "OPD"), ("opd-b", "OPD"), ("opd-c", "OPD"), ("rl-a", "RL")))
            for lab in ("q", "down") for x in (1.0, 2.0)]
    df = pd.DataFrame(rows)
    fig = F.lines(df, "x", "y", "run_id", "t", "x", "y", dash="label")
    colour = {t.name.split(" ")[0]: t.line.color for t in fig.data if t.showlegend}
    opd = style.method_color("OPD")
    assert colour["opd-a"] == opd and colour["rl-a"] == style.method_color("RL")
    assert len({colour["opd-a"], colour["opd-b"], colour["opd-c"]}) == 3
    assert colour["opd-b"] == style.shade(opd, -0.4) and colour["opd-c"] == style.shade(opd, 0.4)
    drawn = {(t.line.color, t.line.dash) for t in fig.data if not t.showlegend}
    assert len(drawn) == 8                      # 4 runs × 2 tensors, every line its own look
    plain = F.lines(df, "x", "y", "run_id", "t", "x", "y")
    assert {t.line.color for t in plain.data} == {opd, style.method_color("RL")}
    assert style.shade("#0072B2", 0.0) == "#0072B2" and style.shade("#0072B2", -1) == "#000000"
    assert style.shade("#0072B2", 1) == "#FFFFFF"
