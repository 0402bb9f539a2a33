"""Dashboard tests with Streamlit's AppTest (no browser): every page renders on a synthetic store, every
sidebar filter changes the figures and the URL, and the empty, running and error states say what to do.

AppTest has no Plotly accessor, so figures are read as JSON from ``at.get("plotly_chart")[i].proto.spec``.
Run: .venv/bin/pytest tests/dashboard/test_app.py -q
"""

from __future__ import annotations

import os

import json
import sys
from pathlib import Path

import duckdb
import pytest
from streamlit.testing.v1 import AppTest

from opdviz.errors import StoreError
from opdviz.store import RunWriter
from opdviz.views.registry import figures_for
from synthetic import make_synthetic_store

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the pages package lives next to app.py

from opdviz.dashboard import cache, sidebar  # noqa: E402

PAGES = ("overview", "sparsity", "spectra", "geometry", "tensor", "compare")
TIMEOUT = 120


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    """Three finished runs (OPD, RL, SFT) × 4 layers, plus two vision-tower tensors in OPD."""
    path = tmp_path_factory.mktemp("app") / "s.duckdb"
    store = make_synthetic_store(path)
    _add_vision_tensors(store, "OPD")
    return str(path)


def _add_vision_tensors(store, run_id: str) -> None:
    """Two vision-encoder FFN matrices with the metrics the group figures read."""
    writer = RunWriter(store, run_id)
    for layer in (0, 1):
        name = f"model.visual.blocks.{layer}.mlp.fc2.weight"
        row = {"tensor": name, "parent": "", "part": "", "tower": "vision", "layer": layer, "block": "ffn",
               "module": "down", "expert": None, "param": "weight", "shape": [32, 128], "rows": 32, "cols": 128,
               "numel": 4096, "dtype": "bfloat16", "status": "ok", "reason": "", "spectrum_exact": True,
               "seconds": 0.01, "seq": 1000 + layer}
        metrics = {"sparsity_exact": 0.5, "sparsity_abs_1e-5": 0.9 - 0.1 * layer, "delta_sq_sum": 1e-3,
                   "base_sq_sum": 1.0, "stable_rank": 3.0}
        writer.write_tensor(name, [row], [{"tensor": name, "metric": k, "value": v} for k, v in metrics.items()],
                            [], [])
    store.fold(wait=30)


def _app(monkeypatch, db_path: str, page: str = "overview", params: dict | None = None) -> AppTest:
    monkeypatch.setenv("OPDVIZ_DB", db_path)
    monkeypatch.setenv("OPDVIZ_PREWARM", "0")      # test_the_warmer_fills_the_cache covers it
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    if params:
        at.query_params.update(params)
    at.run()
    if page != "overview":
        at.switch_page(f"pages/{page}.py").run()
    _no_errors(at)
    return at


def _no_errors(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _specs(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_its_figures(monkeypatch, db, page):
    at = _app(monkeypatch, db, page)
    specs = _specs(at)
    assert len(specs) == len(figures_for(page))
    assert all(spec["data"] for spec in specs), f"a figure on {page} has no traces"
    assert at.title[0].value == page.capitalize()
    labels = {b.proto.label for b in at.get("download_button")}
    assert {"PNG", "SVG", "PDF", "HTML", "CSV", "Parquet"} <= labels
    assert any("zip" in label for label in labels)


@pytest.mark.parametrize("page", ("overlap", "trajectory", "new_analysis", "lab"))
def test_the_other_routed_pages_open_with_the_sidebar(monkeypatch, db, page):
    at = _app(monkeypatch, db, page)
    assert at.sidebar.selectbox(key="f_db").value == db


@pytest.mark.parametrize("widget, value, param, expected", [
    ("f_runs", ["OPD"], "run", "OPD"),
    ("f_towers", ["vision"], "tower", "vision"),
    ("f_layers", (1, 2), "layers", "1-2"),
    ("f_blocks", ["attn"], "block", "attn"),
    ("f_modules", ["q"], "module", "q"),
    ("f_crit", "exact", "crit", "exact"),
])
def test_each_filter_changes_the_figures_and_the_url(monkeypatch, db, widget, value, param, expected):
    at = _app(monkeypatch, db, "sparsity")
    before = _specs(at)
    kind = {"f_layers": "slider", "f_crit": "selectbox"}.get(widget, "multiselect")
    getattr(at.sidebar, kind)(key=widget).set_value(value).run()
    _no_errors(at)
    assert _specs(at)[0]["data"] != before[0]["data"]
    assert at.query_params[param] == expected


def test_the_url_restores_a_view(monkeypatch, db):
    at = _app(monkeypatch, db, params={"run": ["RL", "SFT"], "crit": "exact", "layers": "1-3", "module": "q"})
    assert at.session_state["f_runs"] == ["RL", "SFT"]
    assert at.session_state["f_crit"] == "exact"
    assert tuple(at.session_state["f_layers"]) == (1, 3)
    assert at.session_state["f_modules"] == ["q"]
    heat = _specs(at)[0]["data"]
    assert len(heat) == 2                      # one heatmap panel per selected run
    assert at.query_params["run"] == ["RL", "SFT"]


def test_unknown_url_values_are_dropped(monkeypatch, db):
    at = _app(monkeypatch, db, params={"run": ["nope", "RL"], "crit": "abs_9", "layers": "x"})
    assert at.session_state["f_runs"] == ["RL"]
    assert at.session_state["f_crit"] == "abs_1e-5"
    assert "crit" not in at.query_params and "layers" not in at.query_params


def test_page_controls_go_into_the_url(monkeypatch, db):
    at = _app(monkeypatch, db, "compare")
    at.selectbox(key="p_metric").set_value("stable_rank")
    at.selectbox(key="p_a").set_value("SFT").run()
    _no_errors(at)
    assert at.query_params["metric"] == "stable_rank" and at.query_params["a"] == "SFT"
    assert "stable_rank" in _specs(at)[0]["layout"]["title"]["text"]
    at.switch_page("pages/tensor.py").run()
    assert "metric" not in at.query_params     # another page's controls leave the URL
    name = "model.layers.2.self_attn.o_proj.weight"
    at.selectbox(key="p_tensor").set_value(name).run()
    _no_errors(at)
    assert at.query_params["tensor"] == name
    assert name in _specs(at)[0]["layout"]["title"]["text"]


@pytest.mark.parametrize("state, words", [("missing", "does not exist"), ("empty", "has no runs")])
def test_no_data_says_how_to_get_it(monkeypatch, tmp_path, state, words):
    path = tmp_path / "empty.duckdb"
    if state == "empty":
        duckdb.connect(str(path)).close()
    at = _app(monkeypatch, str(path))
    text = " ".join(i.value for i in at.info)
    assert words in text and "opdviz demo" in text and "opdviz compute" in text
    assert not at.get("plotly_chart")


def test_a_running_run_shows_progress_and_what_is_done(monkeypatch, tmp_path):
    path = tmp_path / "running.duckdb"
    make_synthetic_store(path, finished=False)
    at = _app(monkeypatch, str(path))
    notice = " ".join(i.value for i in at.info)
    assert "SFT" in notice and "still computing" in notice
    assert at.get("progress")
    assert all(spec["data"] for spec in _specs(at))


def test_a_run_whose_process_died_says_so(monkeypatch, tmp_path):
    """A job killed mid-run leaves status 'running'; its lock file names a pid that no longer exists."""
    import socket
    import subprocess
    import sys

    from opdviz.store import Store, computing, lock_path

    path = tmp_path / "killed.duckdb"
    store = make_synthetic_store(path, finished=False)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = lock_path(store, "SFT")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(f"pid {gone.pid} on {socket.gethostname()}")
    assert computing(Store(path), "SFT") is False
    at = _app(monkeypatch, str(path))
    assert not any("still computing" in i.value for i in at.info)
    warning = " ".join(w.value for w in at.warning)
    assert "SFT" in warning and "interrupted" in warning and "process is gone" in warning and "rerun" in warning
    table = at.dataframe[0].value
    assert dict(zip(table["run_id"], table["status"]))["SFT"] == "interrupted"
    assert all(spec["data"] for spec in _specs(at))        # what was computed is still shown
    # the same file naming a live process (this one) reads as computing
    lock.write_text(f"pid {os.getpid()} on {socket.gethostname()}")
    assert computing(Store(path), "SFT") is True
    lock.write_text(f"pid {gone.pid} on some-other-host")
    assert computing(Store(path), "SFT") is None


def test_a_sweep_gets_one_runs_table_and_the_chosen_runs_record(monkeypatch, db):
    """Past EXPANDERS_UP_TO runs, the Overview lists every run in one table and shows the record of the
    run chosen under it (the same expander, open), instead of one expander per run."""
    from opdviz.dashboard import provenance

    at = _app(monkeypatch, db)
    assert sorted(e.label.split(" — ")[0] for e in at.expander) == ["OPD", "RL", "SFT"]
    monkeypatch.setattr(provenance, "EXPANDERS_UP_TO", 2)
    at.run()
    _no_errors(at)
    table = next(d.value for d in at.dataframe if "finished_at" in d.value)
    assert table["run"].tolist() == ["OPD", "RL", "SFT"] and {"method", "done", "skipped", "failed"} <= set(table)
    choose = at.selectbox(key="provenance_run")
    assert choose.options == ["OPD", "RL", "SFT"]
    assert [e.label.split(" — ")[0] for e in at.expander] == ["OPD"] and at.expander[0].proto.expanded
    choose.set_value("SFT").run()
    _no_errors(at)
    assert [e.label.split(" — ")[0] for e in at.expander] == ["SFT"]
    assert any("Inputs" in m.value for m in at.expander[0].markdown)


def test_a_page_of_more_runs_than_the_cap_draws_some_of_them_and_says_which(monkeypatch, db):
    """Past MAX_PANELS selected runs a page draws that many, spread evenly (first and last), says so above
    the figures, and its figures' data hold only the runs drawn; Compare keeps its run A and B."""
    from opdviz.views import facets

    monkeypatch.setattr(facets, "MAX_PANELS", 2)
    at = _app(monkeypatch, db, "sparsity")
    _no_errors(at)
    note = " ".join(i.value for i in at.info)
    assert "draws 2 of the 3 selected runs" in note and "**OPD**" in note and "**SFT**" in note
    names = {t.get("name") for spec in _specs(at) for t in spec["data"] if t.get("name")}
    assert any("OPD" in n for n in names) and any("SFT" in n for n in names)
    assert not any(n.startswith("RL") for n in names)
    at = _app(monkeypatch, db, "compare")
    at.selectbox(key="p_a").set_value("RL").run()
    at.selectbox(key="p_b").set_value("SFT").run()
    _no_errors(at)
    note = " ".join(i.value for i in at.info)
    assert "draws 2 of the 3" in note and "**RL**" in note and "**SFT**" in note and "run A and B kept" in note
    assert "RL" in _specs(at)[2]["layout"]["title"]["text"]          # the difference B − A is drawn


def test_a_store_error_is_shown_without_a_traceback(monkeypatch, db):
    def broken(store, *args):
        raise StoreError(f"{store.db_path} stayed busy for 10s; try again")

    monkeypatch.setitem(cache.QUERIES, "overview_table", broken)
    cache.cached.clear()
    try:
        monkeypatch.setenv("OPDVIZ_DB", db)
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT).run()
        assert not at.exception
        assert "stayed busy" in at.error[0].value
    finally:
        cache.cached.clear()


def test_the_warmer_builds_the_other_pages_once(monkeypatch, db):
    from opdviz.store import Selection
    from opdviz.views.context import ViewContext
    from opdviz.views.registry import FIGURES, RUN_PAGES

    built = []
    build = cache.QUERIES["figure"]
    monkeypatch.setitem(cache.QUERIES, "figure", lambda store, key, *a: built.append(key) or build(store, key, *a))
    view = cache.View(db, cache.stamp(db), Selection(runs=("RL",), layer_min=1), ViewContext(criterion="abs_1e-6"))
    warmer = cache.Warmer()
    try:
        warmer.warm(view, exclude="overview")
        warmer.warm(view, exclude="overview")          # the same request twice: one pass
        thread = warmer._thread
        if thread is not None:
            thread.join(timeout=120)
            assert not thread.is_alive()
        expected = [s.key for s in FIGURES if s.page in RUN_PAGES and s.page not in ("overview", "compare")]
        assert built == expected
        warmer.submit((db, view.stamp, expected[0], view.sel, view.ctx)).result(timeout=60)
        assert built == expected                        # answered from the cache
    finally:
        warmer.pool.shutdown()


def test_criterion_labels_cover_every_stored_name():
    assert sidebar.criterion_label("abs_1e-5") == "|ΔW| > 1e-5"
    assert sidebar.criterion_label("exact").startswith("exact")
    assert "RMS" in sidebar.criterion_label("relrms_1e-3") and "bf16" in sidebar.criterion_label("bf16_1e-3")
