"""One source of truth for every number a user sees.

On a real store (tiny Llama checkpoints through `opdviz compute`, `overlap` and `trajectory`, with a 0-d
and a 1×N tensor), every figure of the registry plots exactly the numbers of the data it exports, and
those numbers equal an independent float64 recomputation from what `opdviz metrics` exports (scalar
figures) or from the stored counts and arrays (overlap, trajectory, spectra); tables format each number
by its unit in the metric catalog; untrusted labels render literally.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

import factory
from opdviz import cli
from opdviz.views import export as figexport
from opdviz.views import formatting
from opdviz.store import queries as Q
from opdviz.store import summary as S
from opdviz.views import registry, sparsity, tables
from opdviz.metrics.registry import AGGREGATIONS, DERIVED, UNITS, agg_label, all_families, family_of
from opdviz.store import Selection, Store
from opdviz.views.context import AcrossContext, ViewContext

CFG = factory.llama_config(layers=2, hidden=32, ffn=48, heads=4, kv_heads=2, vocab=40)
HOSTILE = "RL <b>bold</b> & <a href='x'>link</a>"
SPECS = list(registry.FIGURES)


def _post(base: dict, seed: int, frac: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in base.items():
        flat = w.float().reshape(-1).clone()
        m = torch.rand(flat.numel(), generator=g) < frac
        flat[m] += 0.05 * torch.randn(int(m.sum()), generator=g) + 0.01
        out[name] = flat.view(w.shape).to(w.dtype)
    return out


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("numbers")
    base = factory.make_llama_state(CFG, seed=0, dtype=torch.float32)
    base["model.logit_scale"] = torch.tensor(1.5)                   # 0-d
    base["model.layers.0.mlp.probe.weight"] = torch.randn(1, 32)     # 1×N
    a, b = _post(base, 1, 0.3), _post(base, 2, 0.2)
    half = {n: (w + a[n]) / 2 for n, w in base.items()}
    p = {"base": factory.save_checkpoint(base, root / "base", config=CFG),
         "a": factory.save_checkpoint(a, root / "a", config=CFG),
         "b": factory.save_checkpoint(b, root / "b", config=CFG),
         "half": factory.save_checkpoint(half, root / "half", config=CFG)}
    db = str(root / "s.duckdb")
    for argv in (["compute", str(p["base"]), str(p["a"]), "--name", "a", "--method", "OPD"],
                 ["compute", str(p["base"]), str(p["b"]), "--name", "b", "--method", HOSTILE],
                 ["compute", str(p["base"]), str(p["b"]), "--name", "c", "--method", "SFT", "--spectrum", "approx",
                  "--approx-rank", "4"],
                 ["overlap", "--base", str(p["base"]), "--a", str(p["a"]), "--b", str(p["b"]), "--run-a", "a",
                  "--run-b", "b"],
                 ["trajectory", str(p["base"]), str(p["half"]), str(p["a"]), "--steps", "5", "10", "--name", "a-traj",
                  "--method", "OPD"]):
        assert cli.main(argv + ["--db", db, "--no-progress"]) == 0
    out = root / "export.csv"
    assert cli.main(["metrics", "--db", db, "-o", str(out)]) == 0
    return Store(db), pd.read_csv(out)


SEL = Selection(runs=("a", "b"))


def _build(store, spec):
    ctx = AcrossContext() if spec.page in registry.ACROSS_PAGES else ViewContext()
    sel = Selection() if spec.page == "trajectory" else SEL
    return spec.build(store, sel, ctx)


def _plotted(fig) -> np.ndarray:
    """Every number drawn as data: heatmap z, scatter/bar y (x for horizontal marginals); baselines
    (meta baseline) and legend-only keys left out."""
    vals = []
    for t in fig.data:
        if isinstance(t.meta, dict) and t.meta.get("baseline"):
            continue
        if t.type == "heatmap":
            vals.append(np.asarray(t.z, dtype=float).ravel())
        elif t.type in ("scatter", "bar"):
            for arr in (t.y, t.x):
                if arr is not None and len(arr) and not (len(arr) == 1 and arr[0] is None):
                    a = pd.to_numeric(pd.Series(list(arr)), errors="coerce").to_numpy(dtype=float)
                    vals.append(a)
    v = np.concatenate(vals) if vals else np.array([])
    return v[np.isfinite(v)]


def _candidates(df: pd.DataFrame) -> np.ndarray:
    num = df.select_dtypes("number").to_numpy(dtype=float).ravel()
    num = num[np.isfinite(num)]
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log2(num[num > 0])
    # display transforms of the catalog units: fraction ×100, ×10³ heatmaps, radians → degrees, log₂ ratios
    return np.unique(np.concatenate([num, 100 * num, 1e3 * num, np.degrees(num), logs]))


@pytest.mark.parametrize("spec", SPECS, ids=[s.key for s in SPECS])
def test_every_figure_plots_the_data_it_exports(real, spec):
    store, _ = real
    fig, df = _build(store, spec)
    assert not figexport.is_empty(fig), f"{spec.key} has no data on the test store"
    plotted = _plotted(fig)
    assert plotted.size, spec.key
    cand = _candidates(df)
    idx = np.clip(np.searchsorted(cand, plotted), 1, len(cand) - 1)
    near = np.minimum(np.abs(cand[idx] - plotted), np.abs(cand[idx - 1] - plotted))
    bad = plotted[near > 1e-9 * np.maximum(1, np.abs(plotted))]
    assert bad.size == 0, f"{spec.key} plots numbers its data (CSV) does not hold: {bad[:5]}"


# ------------------------------------------------------------------------------ independent references
def _leaves(store, export: pd.DataFrame) -> pd.DataFrame:
    """The export restricted to runs a, b and leaf tensors (fused parents counted through their parts),
    with numel from the tensor table."""
    t = Q.tensors(store, Selection(runs=("a", "b"), leaves_only=False))
    parents = set(t["parent"].dropna()) - {""}
    numel = t.set_index(["run_id", "tensor"])["numel"]
    e = export[export["run"].isin(["a", "b"]) & ~export["tensor"].isin(parents)].copy()
    e["numel"] = [float(numel[(r, x)]) for r, x in zip(e["run"], e["tensor"])]
    return e


def _wide(e: pd.DataFrame) -> pd.DataFrame:
    keys = ["run", "tensor", "layer", "block", "module", "numel"]
    w = e.pivot_table(index=["run", "tensor"], columns="metric", values="value", aggfunc="first")
    w.columns.name = None
    return e[keys].drop_duplicates(["run", "tensor"]).merge(w.reset_index(), on=["run", "tensor"])


def _same(got: pd.Series, ref: pd.Series) -> None:
    """Two series keyed by the same index names hold the same numbers for the same keys (rtol 1e-12)."""
    g, r = got.rename("got").reset_index(), ref.rename("ref").reset_index()
    keys = [c for c in g.columns if c != "got"]
    for d in (g, r):
        if "layer" in d:
            d["layer"] = pd.to_numeric(d["layer"]).fillna(-1).astype(int)
    m = g.merge(r, on=keys, how="outer")
    assert len(m) == len(g) == len(r), m[m["got"].isna() | m["ref"].isna()]
    np.testing.assert_allclose(m["got"].to_numpy(float), m["ref"].to_numpy(float), rtol=1e-12)


def _weighted(w: pd.DataFrame, keys, col, weight) -> pd.Series:
    d = w[w[col].notna()].assign(_w=weight, _v=lambda x: x[col] * weight)
    g = d.groupby(keys, dropna=False)[["_v", "_w"]].sum()
    return g["_v"] / g["_w"]


def test_sparsity_and_energy_figures_equal_the_metrics_export(real):
    store, export = real
    w = _wide(_leaves(store, export))
    ref = _weighted(w, ["run", "layer", "module"], "sparsity_abs_1e-5", w["numel"])
    for key in ("overview.sparsity_heatmap", "sparsity.layerwise"):
        _, df = registry.figure_spec(key).build(store, SEL, ViewContext())
        got = df.rename(columns={"run_id": "run"}).groupby(["run", "layer", "module"], dropna=False)["sparsity"]
        # a heatmap cell is (layer, block, module): the test's groups (layer, module) hold one block each
        _same(got.first(), ref)
    # energy share per module: Σ ΔW² of the module / Σ ΔW² of the run
    sq = w.groupby(["run", "module"])["delta_sq_sum"].sum()
    share = sq / sq.groupby(level=0).transform("sum")
    _, df = registry.figure_spec("overview.energy_share").build(store, SEL, ViewContext())
    _same(df.rename(columns={"run_id": "run"}).groupby(["run", "module"])["energy_share"].sum(), share)
    # every criterion, parameter-weighted over the whole selection
    _, df = registry.figure_spec("sparsity.criteria").build(store, SEL, ViewContext())
    for row in df.itertuples():
        col = f"sparsity_{row.criterion}"
        part = w[w["run"] == row.run_id]
        assert row.sparsity == pytest.approx((part[col] * part["numel"]).sum() / part["numel"].sum(), rel=1e-12)


def test_coverage_figure_table_and_export_agree(real):
    """Model-level coverage = Σ|M∩U|/Σ|U| (pooled by the changed entries of the run's default mask): the
    Overview figure, its CSV, the Overview table and the `opdviz metrics` export give one number."""
    store, export = real
    w = _wide(_leaves(store, export))
    u = (1 - w["sparsity_abs_1e-5"]) * w["numel"]
    _, fig_df = registry.figure_spec("overview.coverage").build(store, SEL, ViewContext())
    table = tables.overview_table(store, SEL, ViewContext())
    for kind, prefix, col in (("principal mask", "principal_coverage", "principal_coverage_10pct"),
                              ("low-magnitude mask", "lowmag_coverage", "lowmag_coverage_10pct")):
        for a in sparsity.ALPHAS:
            ref = _weighted(w, ["run"], f"{prefix}_{a}pct", u)
            got = fig_df[(fig_df["kind"] == kind) & np.isclose(fig_df["alpha"], a / 100)]
            _same(got.rename(columns={"run_id": "run"}).set_index("run")["coverage"], ref)
        _same(table.rename(columns={"run_id": "run"}).set_index("run")[col],
              _weighted(w, ["run"], f"{prefix}_10pct", u))
    # sparsity and relative change of the table: parameter-weighted and pooled
    for run, part in w.groupby("run"):
        row = table.set_index("run_id").loc[run]
        assert row["sparsity_abs_1e-5"] == pytest.approx((part["sparsity_abs_1e-5"] * part["numel"]).sum()
                                                         / part["numel"].sum(), rel=1e-12)
        assert row["rel_change"] == pytest.approx(math.sqrt(part["delta_sq_sum"].sum() / part["base_sq_sum"].sum()),
                                                  rel=1e-12)
        assert row["top16_energy"] == pytest.approx(part["top16_energy"].mean(), rel=1e-12)   # mean over matrices


@pytest.mark.parametrize("key,metric", [("spectra.stable_rank", "stable_rank"), ("geometry.nss_heatmap", "nss")])
def test_per_matrix_means_equal_the_export(real, key, metric):
    store, export = real
    w = _wide(_leaves(store, export))
    ref = w[w[metric].notna()].groupby(["run", "layer", "block", "module"], dropna=False)[metric].mean()
    _, df = registry.figure_spec(key).build(store, SEL, ViewContext())
    got = df[df[f"{metric}_mean"].notna()].rename(columns={"run_id": "run"})
    _same(got.set_index(["run", "layer", "block", "module"])[f"{metric}_mean"], ref)


# the catalog rule of each kind, recomputed in float64 from the export (numel from the store): value per tensor
# in ``w``, the group's rows ``g`` → one number
def _ref_pool(g: pd.DataFrame, metric: str, mask: str) -> float:
    agg = family_of(metric).agg
    v = g[metric].astype(float)
    ok = v.notna()
    weights = {"numel": g["numel"], "changed": (1 - g[f"sparsity_{mask}"]) * g["numel"],
               "changed_exact": (1 - g["sparsity_exact"]) * g["numel"], "energy": g["delta_sq_sum"]}
    if agg in weights:
        wt = weights[agg].astype(float)[ok]
        return float((v[ok] * wt).sum() / wt.sum()) if wt.sum() > 0 else float("nan")
    if agg == "pooled" and metric == "rel_change":
        return math.sqrt(g.loc[ok, "delta_sq_sum"].sum()) / math.sqrt(g.loc[ok, "base_sq_sum"].sum())
    if agg == "pooled":
        return math.sqrt((v[ok] ** 2).sum())
    if agg in ("max", "min", "sum"):
        return float(getattr(v[ok], agg)()) if ok.any() else float("nan")
    assert agg == "matrix_mean", agg
    return float(v[ok].mean()) if ok.any() else float("nan")


COMPARE_METRICS = [          # one or more of every pooling rule a stored scalar has
    ("sparsity", "numel"), ("lowmag_coverage_10pct", "changed"), ("principal_coverage_exact_5pct", "changed_exact"),
    ("coord_energy_top_1pct", "energy"), ("rel_change", "pooled"), ("delta_fro", "pooled"),
    ("delta_mean_abs", "numel"), ("stable_rank", "matrix_mean"), ("angle_left_max_rad_k16", "matrix_mean"),
    ("delta_max_abs", "max"), ("spectrum_exact", "min")]


def _trace_run(t) -> str:
    """The run a Compare trace draws: bars name it in the hover's <extra>, lines in the trace name."""
    m = re.search(r"<extra>(.*?)</extra>", t.hovertemplate or "")
    return m.group(1) if m and m.group(1) else str(t.name).split(" ")[0]


@pytest.mark.parametrize("metric,agg", COMPARE_METRICS, ids=[m for m, _ in COMPARE_METRICS])
def test_compare_figures_pool_by_the_catalog_rule(real, metric, agg):
    """The numbers the three Compare figures draw equal the catalog rule applied, in float64, to what
    `opdviz metrics` exports (numel from the store): parameter-weighted, changed- or energy-weighted, pooled
    sums, max/min or the mean over matrices — and the axis says which rule it is."""
    store, export = real
    name = "sparsity_abs_1e-5" if metric == "sparsity" else metric
    assert family_of(name).agg == agg
    w = _wide(_leaves(store, export))
    mask = {r: json.loads(store.run_row(r)["options"])["criterion"] for r in ("a", "b")}
    scale = formatting.scale_of(name)
    ctx = ViewContext(metric=metric, run_a="a", run_b="b")

    def ref(keys):
        rows = [{**dict(zip(keys, k if isinstance(k, tuple) else (k,))), "ref": scale * _ref_pool(g, name, mask[g["run"].iloc[0]])}
                for k, g in w.groupby(keys, dropna=False)]
        return pd.DataFrame(rows)

    # per module: one bar per (run, module)
    fig, _ = registry.figure_spec("compare.bars").build(store, SEL, ctx)
    assert fig.layout.yaxis.title.text == formatting.label_of(name) + "<br>" + agg_label(agg)   # says how it pools
    got = pd.DataFrame([{"run": _trace_run(t), "module": x, "got": y} for t in fig.data if t.type == "bar"
                        for x, y in zip(t.x, t.y)])
    r = ref(["run", "module"])
    m = got.merge(r, on=["run", "module"], how="outer")
    assert len(m) == len(r) == len(got), m
    np.testing.assert_allclose(m["got"].to_numpy(float), m["ref"].to_numpy(float), rtol=1e-12, equal_nan=True)
    # per layer: one line per run (tensors without a layer are not drawn)
    fig, _ = registry.figure_spec("compare.layerwise").build(store, SEL, ctx)
    got = pd.DataFrame([{"run": _trace_run(t), "layer": int(x), "got": y} for t in fig.data
                        if t.type == "scatter" and t.x is not None for x, y in zip(t.x, t.y) if x is not None])
    r = ref(["run", "layer"]).dropna(subset=["layer"]).astype({"layer": int})
    m = got.merge(r, on=["run", "layer"], how="inner")
    assert len(m) == len(got) and set(m["run"]) == {"a", "b"}
    np.testing.assert_allclose(m["got"].to_numpy(float), m["ref"].to_numpy(float), rtol=1e-12, equal_nan=True)
    # B − A per layer and module: the heatmap cell
    fig, _ = registry.figure_spec("compare.difference").build(store, SEL, ctx)
    hm = fig.data[0]
    ra = ref(["run", "layer", "module"]).dropna(subset=["layer"])
    a = ra[ra["run"] == "a"].set_index(["layer", "module"])["ref"]
    b = ra[ra["run"] == "b"].set_index(["layer", "module"])["ref"]
    z = np.asarray(hm.z, dtype=float)
    cells = {(int(y), x): z[i, j] for i, y in enumerate(hm.y) for j, x in enumerate(hm.x)}
    for (layer, module), d in (b - a).items():
        np.testing.assert_allclose(cells[(int(layer), module)], d, rtol=1e-9, atol=1e-15 * scale, equal_nan=True)


def test_group_summary_and_run_summary_pool_by_the_catalog(real):
    """Every group summary that aggregates catalog metrics goes through the one rule (summary.pool_sql)."""
    store, export = real
    w = _wide(_leaves(store, export))
    names = tuple(m if m != "sparsity" else "sparsity_abs_1e-5" for m, _ in COMPARE_METRICS)
    df = S.run_summary(store, SEL, matrix_metrics=names)
    for run, g in w.groupby("run"):
        row = df.set_index("run_id").loc[run]
        for n in names:
            assert row[n] == pytest.approx(_ref_pool(g, n, "abs_1e-5"), rel=1e-12, nan_ok=True), n


def test_overlap_figures_equal_the_stored_counts(real):
    store, _ = real
    c = store.query("SELECT criterion, sum(n_a) a, sum(n_b) b, sum(n_ab) ab, sum(numel) n FROM overlap "
                    "WHERE run_a = 'a' AND run_b = 'b' GROUP BY criterion")
    _, df = registry.figure_spec("overlap.criteria").build(store, Selection(), AcrossContext())
    got = df.set_index("criterion")
    for r in c.itertuples():
        pa, pb = r.a / r.n, r.b / r.n
        assert got.at[r.criterion, "jaccard"] == pytest.approx(r.ab / (r.a + r.b - r.ab), rel=1e-12)
        assert got.at[r.criterion, "jaccard_ratio"] == pytest.approx(
            (r.ab / (r.a + r.b - r.ab)) / (pa * pb / (pa + pb - pa * pb)), rel=1e-12)


def test_trajectory_step_sparsity_equals_the_per_step_export(real):
    store, export = real
    _, df = registry.figure_spec("trajectory.step_metric").build(store, Selection(), AcrossContext())
    t = Q.tensors(store, Selection(runs=("a-traj@5", "a-traj@10")))
    e = export[export["run"].isin(t["run_id"]) & export["tensor"].isin(t["tensor"])
               & (export["metric"] == "sparsity_abs_1e-5")]
    e = e.merge(t[["run_id", "tensor", "numel"]], left_on=["run", "tensor"], right_on=["run_id", "tensor"])
    e["step"] = e["run"].str.split("@").str[1].astype(int)
    ref = (e["value"] * e["numel"]).groupby([e["step"], e["module"]]).sum() / e["numel"].groupby(
        [e["step"], e["module"]]).sum()
    ref.index.names = ["step", "module"]
    _same(df.set_index(["step", "module"])["sparsity"], ref)


# ------------------------------------------------------------------------------ engine edge cases
def test_scalar_and_1xN_tensors_are_analysed(real):
    store, export = real
    t = Q.tensors(store, Selection(runs=("a",), leaves_only=False)).set_index("tensor")
    assert t.at["model.logit_scale", "status"] == "ok" and t.at["model.logit_scale", "numel"] == 1
    e = export[(export["run"] == "a") & (export["tensor"] == "model.layers.0.mlp.probe.weight")]
    m = e.set_index("metric")["value"]
    # one singular value σ₁ = ‖ΔW‖F: stable and effective rank 1, all energy in the top direction
    assert m["stable_rank"] == pytest.approx(1.0) and m["effective_rank"] == pytest.approx(1.0)
    assert m["top1_energy"] == pytest.approx(1.0) and m["sigma_max"] == pytest.approx(m["delta_fro"], rel=1e-6)
    # the left space of a 1×N matrix is R¹: its angles are undefined, the right ones are not
    assert math.isnan(m["angle_left_max_rad_k16"]) and m["angle_right_max_rad_k16"] > 0


def test_angles_at_full_space_k_are_undefined(real):
    """k = 64 ≥ the 32-wide side of every attention/FFN matrix: that side's angles are NaN, never 0."""
    store, export = real
    e = export[(export["run"] == "a") & (export["tensor"] == "model.layers.0.self_attn.q_proj.weight")]
    m = e.set_index("metric")["value"]
    assert math.isnan(m["angle_left_max_rad_k64"]) and math.isnan(m["angle_right_max_rad_k64"])   # 32×32
    assert m["angle_left_max_rad_k16"] > 0
    arr = Q.array(store, "a", "model.layers.0.self_attn.q_proj.weight", "angles_right_k64")
    assert np.isnan(arr).all()


# ------------------------------------------------------------------------------ catalog and formatting
def test_every_number_has_one_unit_and_aggregation():
    for info in all_families() + DERIVED:
        assert info.unit in UNITS and info.agg in AGGREGATIONS and info.label, info.family


@pytest.mark.parametrize("name,value,text", [
    ("jaccard_ratio", 1.73, "1.73"),                  # a ratio is never shown ×100
    ("cov_a_ratio", 12.5, "12.5"),
    ("jaccard", 0.0123, "1.23 %"),
    ("sparsity_abs_1e-5", 0.93712, "93.71 %"),
    ("principal_enrichment_10pct", 1.4, "1.4"),
    ("stable_rank", 3.0, "3"),
    ("angle_left_max_rad_k16", math.pi / 4, "45°"),
    ("rel_change", 0.00123, "0.00123"),
    ("base_bytes", 3 * 1024 ** 2, "3.00 MiB"),
    ("nss", float("nan"), "—"),
])
def test_format_value_by_unit(name, value, text):
    assert formatting.format_value(name, value) == text
    assert formatting.format_value(name, value, approx=True) == (text if text == "—" else "≈" + text)


def test_table_display_scales_only_fractions():
    df = pd.DataFrame({"jaccard": [0.2], "jaccard_ratio": [1.5], "p_a": [0.1], "layer": [3]})
    shown = formatting.display(df)
    assert shown.to_dict("records") == [{"jaccard": 20.0, "jaccard_ratio": 1.5, "p_a": 10.0, "layer": 3}]
    fmts = formatting.column_formats(df)
    assert fmts["jaccard_ratio"][1] == "%.3g" and fmts["jaccard"][1].endswith("%%") and "layer" not in fmts
    assert family_of("sparsity_abs_1e-5").unit == "fraction"


def test_untrusted_labels_render_literally(real):
    store, _ = real
    fig, _ = registry.figure_spec("sparsity.criteria").build(store, SEL, ViewContext())
    names = [t.name for t in fig.data if t.name]
    assert any("&lt;b&gt;bold&lt;/b&gt; &amp; &lt;a href='x'&gt;" in n for n in names)
    assert not any("<b>" in n or "<a " in n for n in names)
    fig, _ = registry.figure_spec("overview.sparsity_heatmap").build(store, SEL, ViewContext())
    titles = [a.text for a in fig.layout.annotations]
    assert not any("<b>" in t for t in titles) and any("&lt;b&gt;" in t for t in titles)


def test_approximate_values_are_marked_in_every_export(real):
    store, _ = real
    counts = tables.approx_counts(store, Selection(runs=("a", "b", "c")))
    assert set(counts) == {"c"} and counts["c"] > 0
    sel = Selection(runs=("a", "c"))
    man = figexport.manifest(store, sel, ViewContext())
    assert man["approximate"] == {"c": counts["c"]}
    assert [r["approx_spectra"] for r in man["runs"]] == [0, counts["c"]]
    table = tables.overview_table(store, sel, ViewContext()).set_index("run_id")
    assert table.at["a", "approx_spectra"] == 0 and table.at["c", "approx_spectra"] == counts["c"]
    items = [("sparsity.sweep", *registry.figure_spec("sparsity.sweep").build(store, sel, ViewContext()))]
    import io
    import zipfile
    zf = zipfile.ZipFile(io.BytesIO(figexport.page_zip(items, fmt="html", manifest=man)))
    assert "Approximate" in zf.read("README.txt").decode()


def test_cli_figures_covers_every_page_and_leaves_steps_out(real, tmp_path):
    import json

    store, _ = real
    out = tmp_path / "figs"
    assert cli.main(["figures", "--db", str(store.db_path), "--out", str(out), "--format", "html",
                     "--page", "overlap", "--page", "trajectory"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    keys = {f["key"] for f in man["figures"]}
    assert {s.key for s in registry.FIGURES if s.page in registry.ACROSS_PAGES} == keys
    assert all((out / f["file"]).exists() and (out / f["data"]).exists() for f in man["figures"])
    # as the dashboard's "all runs": the trajectory's per-step runs are not among the runs shown
    assert [r["run_id"] for r in man["runs"]] == ["a", "b", "c"] and man["filters"]["runs"] == ["a", "b", "c"]
    steps = tmp_path / "steps"
    assert cli.main(["figures", "--db", str(store.db_path), "--out", str(steps), "--format", "html",
                     "--figure", "overview.energy_share", "--with-steps"]) == 0
    man = json.loads((steps / "manifest.json").read_text())
    assert {"a-traj@5", "a-traj@10"} <= {r["run_id"] for r in man["runs"]}
    assert [f["key"] for f in man["figures"]] == ["overview.energy_share"]
