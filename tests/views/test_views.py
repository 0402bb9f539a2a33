"""The figure registry on a realistic synthetic store and on an empty one; overview table; provenance."""

from __future__ import annotations

import math

import pytest
from figcheck import assert_valid
from synthetic import make_synthetic_store

from opdviz.views import figures as F
from opdviz.views import style
from opdviz.store import Selection, Store
from opdviz.views.context import ViewContext
from opdviz.views.registry import FIGURES, PAGES, RUN_PAGES, figure_spec, figures_for
from opdviz.views.tables import overview_table, provenance


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Store:
    return make_synthetic_store(tmp_path_factory.mktemp("views") / "s.duckdb")


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("empty") / "none.duckdb")


# the single-run figures (the across-run ones read tables the synthetic store lacks: test_overlap, test_trajectory)
RUN_FIGURES = [f for f in FIGURES if f.page in RUN_PAGES]


def _empty(fig) -> bool:
    return any(F.NO_DATA in (a.text or "") or "pick two" in (a.text or "") for a in fig.layout.annotations)


def test_every_page_has_figures_and_keys_are_unique():
    assert {f.page for f in FIGURES} == set(PAGES)
    assert len({f.key for f in FIGURES}) == len(FIGURES)
    assert all(f.caption and f.title for f in FIGURES)
    with pytest.raises(ValueError):
        figures_for("nope")


@pytest.mark.parametrize("spec", RUN_FIGURES, ids=lambda s: s.key)
def test_builds_on_synthetic_store(store, spec):
    fig, df = spec.build(store, Selection(), ViewContext())
    assert not _empty(fig), f"{spec.key} drew no data"
    assert len(df) > 0 and len(fig.data) > 0
    assert_valid(fig)


@pytest.mark.parametrize("spec", RUN_FIGURES, ids=lambda s: s.key)
def test_builds_on_empty_store(empty_store, spec):
    fig, _ = spec.build(empty_store, Selection(), ViewContext())
    assert _empty(fig)
    assert_valid(fig)


@pytest.mark.parametrize("spec", RUN_FIGURES, ids=lambda s: s.key)
def test_builds_on_selection_without_rows(store, spec):
    fig, _ = spec.build(store, Selection(runs=("no-such-run",)), ViewContext())
    assert _empty(fig)


def test_run_colour_is_its_method_colour_on_every_page(store):
    for spec in RUN_FIGURES:
        fig, _ = spec.build(store, Selection(), ViewContext())
        for t in fig.data:
            if t.name and t.name.split(" ")[0] in ("OPD", "RL", "SFT") and t.showlegend is not False:
                color = t.marker.color if t.type == "bar" else t.line.color
                assert color == style.method_color(t.name.split(" ")[0]), spec.key


def test_selection_filters_runs_and_modules(store):
    fig, df = figure_spec("sparsity.layerwise").build(store, Selection(runs=("RL",), modules=("q", "down")),
                                                      ViewContext())
    assert set(df["run_id"]) == {"RL"} and set(df["module"]) == {"q", "down"}


def test_criterion_changes_sparsity(store):
    _, loose = figure_spec("overview.sparsity_heatmap").build(store, Selection(), ViewContext(criterion="abs_1e-4"))
    _, strict = figure_spec("overview.sparsity_heatmap").build(store, Selection(), ViewContext(criterion="exact"))
    assert loose["sparsity"].mean() > strict["sparsity"].mean()


def test_tensor_page_uses_chosen_tensor_and_fused_parent(store):
    parent = "model.layers.0.self_attn.qkv_proj.weight"
    fig, df = figure_spec("tensor.spectrum").build(store, Selection(), ViewContext(tensor=parent))
    assert set(df["tensor"]) == {parent} and len(df["run_id"].unique()) == 3
    fig, df = figure_spec("tensor.sparsity_map").build(store, Selection(runs=("SFT",)), ViewContext(tensor=parent))
    assert set(df["run_id"]) == {"SFT"}


@pytest.mark.parametrize("metric", ["sparsity", "energy_share", "rel_change", "stable_rank", "top16_energy", "nss"])
def test_compare_metrics(store, metric):
    for key in ("compare.bars", "compare.layerwise", "compare.difference"):
        fig, df = figure_spec(key).build(store, Selection(), ViewContext(metric=metric, run_a="OPD", run_b="SFT"))
        assert not _empty(fig), (key, metric)
    assert set(df[["run_a", "run_b"]].iloc[0]) == {"OPD", "SFT"}


def test_difference_needs_two_runs(store):
    fig, _ = figure_spec("compare.difference").build(store, Selection(runs=("OPD",)), ViewContext())
    assert _empty(fig)


def test_overview_table(store):
    t = overview_table(store, Selection(), ViewContext())
    assert list(t["run_id"]) == ["OPD", "RL", "SFT"]
    row = t.set_index("run_id").loc["OPD"]
    assert row["random_baseline_10pct"] == 0.10
    assert row["lowmag_enrichment_10pct"] == pytest.approx(row["lowmag_coverage_10pct"] / 0.10)
    assert row["lowmag_enrichment_10pct"] > 1 > row["principal_enrichment_10pct"]
    assert row["accuracy"] == pytest.approx(0.51) and row["accuracy_gain"] == pytest.approx(0.09)
    by = t.set_index("run_id")["sparsity_abs_1e-5"]
    assert by["RL"] > by["OPD"] > by["SFT"]                  # the synthetic profiles
    assert overview_table(Store("/nonexistent/x.duckdb"), Selection(), ViewContext()).empty


def test_provenance(store):
    p = provenance(store, "OPD")
    assert p["base_path"] and p["options"]["seed"] == 0 and p["versions"]
    assert p["n_failed"] == 1 and p["n_skipped"] == 1 and p["status"] == "done"
    assert isinstance(p["created_at"], str) and math.isfinite(p["wall_s"])
    assert provenance(store, "nope") == {}


def test_unfinished_store_is_readable(tmp_path):
    s = make_synthetic_store(tmp_path / "u.duckdb", runs=("OPD", "GRPO"), layers=2, finished=False)
    assert not s.db_path.exists()          # nothing folded: readers see the staging fragments
    t = overview_table(s, Selection(), ViewContext())
    assert set(t["run_id"]) == {"OPD", "GRPO"}
    assert dict(zip(t["run_id"], t["status"]))["GRPO"] == "running"


def test_principal_projection_x_is_k_over_min_dim(store):
    _, df = figure_spec("geometry.principal_projection").build(store, Selection(), ViewContext())
    assert df["rank_frac"].max() == pytest.approx(1.0)
    last = df[df["rank_frac"] == df["rank_frac"].max()]
    assert last["share"].to_numpy() == pytest.approx(1.0)      # all of ΔW lies in the full subspace


def test_principal_projection_of_a_store_without_grid_arrays(tmp_path, store):
    """Runs computed before proj_*_grid existed: the figure puts their full by-rank curves on the same grid."""
    import shutil

    import duckdb

    old = Store(tmp_path / "old.duckdb")
    shutil.copy(store.db_path, old.db_path)
    with duckdb.connect(str(old.db_path)) as con:
        con.execute("DELETE FROM small_arrays WHERE name LIKE 'proj_%_grid' AND run_id = 'RL'")
    spec = figure_spec("geometry.principal_projection")
    _, new_df = spec.build(store, Selection(), ViewContext())
    _, old_df = spec.build(old, Selection(), ViewContext())
    keys = ["run_id", "kind", "rank_frac"]
    a, b = new_df.sort_values(keys).reset_index(drop=True), old_df.sort_values(keys).reset_index(drop=True)
    assert set(a["run_id"]) == set(b["run_id"]) and len(a) == len(b)
    assert a["share"].to_numpy() == pytest.approx(b["share"].to_numpy(), rel=1e-12)


def test_spectra_rows_by_segments_equal_the_grouped_pandas_rows():
    """The spectra frame is computed per contiguous spectrum with numpy; it must equal the groupby path it
    replaces, with NaN values, an empty spectrum, a zero and a missing ‖ΔW‖²_F, and a null method."""
    import numpy as np
    import pandas as pd

    from opdviz.views import spectra as VS

    a = pd.DataFrame({"run_id": ["A", "A", "B", "C"], "method": ["OPD", "OPD", None, "SFT"],
                      "tensor": ["t1", "t2", "t1", "t1"], "label": ["x", "y", "x", "x"],
                      "delta_sq_sum": [10.0, 0.0, np.nan, 3.0],
                      "values": [np.array([3.0, 1.0, np.nan, 0.5]), np.array([]), np.array([2.0, 2.0]),
                                 np.array([np.nan])]})
    fast = VS._spectra_rows(a)
    pd.testing.assert_frame_equal(fast, VS._spectra_frame_grouped(a), check_dtype=False, rtol=1e-13)
    assert fast["index"].tolist() == [1, 2, 3, 4, 1, 1, 2, 1]
    assert fast["cumulative_energy"].iloc[3] == pytest.approx((9 + 1 + 0.25) / 10)
