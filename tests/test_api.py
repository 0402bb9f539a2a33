"""The Python API (opdviz.analyze / open / overlap / trajectory / masks): computing, resuming, refusing bad
input, and reading back the same rows and values as the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from safetensors.torch import load_file

import factory
import opdviz
from opdviz import cli
from opdviz.errors import OptionsError, StoreError

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["run", "method", "tensor", "tower", "layer", "block", "module", "metric", "value"]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """A base, two post-trained checkpoints (OPD-like, RL-like) and two trajectory steps of the RL one."""
    root = tmp_path_factory.mktemp("api")
    cfg = factory.llama_config()
    base = factory.make_llama_state(cfg, seed=0)
    paths = {"base": factory.save_checkpoint(base, root / "base", shards=2, config=cfg)}
    for name, seed, density in (("opd", 1, 0.3), ("rl", 2, 0.2), ("rl-step10", 3, 0.1)):
        paths[name] = factory.save_checkpoint(factory.post_train(base, seed=seed, density=density), root / name,
                                              shards=1 + (seed % 2), config=cfg)
    return paths


@pytest.fixture(scope="module")
def db(ckpts, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("db") / "api.duckdb"
    runs = opdviz.analyze(ckpts["base"], [ckpts["opd"], ckpts["rl"]], db=path, name=["opd", "rl"],
                          method=["OPD", "RL"], device="cpu", progress=False)
    assert [r.status for r in runs] == ["done", "done"]
    return path


# ------------------------------------------------------------------------------------------ analyze
def test_analyze_returns_the_run_summary(db, ckpts):
    store = opdviz.open(db)
    runs = store.runs().set_index("run_id")
    assert list(runs.index) == ["opd", "rl"] and list(runs["method"]) == ["OPD", "RL"]
    again = opdviz.analyze(ckpts["base"], ckpts["opd"], db=db, name="opd", method="OPD", device="cpu", progress=False)
    assert isinstance(again, opdviz.RunSummary)           # one post → one summary, a list → a list
    assert again.run_id == "opd" and again.status == "done" and again.db == Path(db)
    assert again.n_done == runs.at["opd", "n_tensors"] == again.n_tensors > 0
    assert again.n_failed == 0 and again.device == "cpu"
    assert "opd: done" in str(again)
    with pytest.raises(Exception):
        again.status = "x"                                  # frozen


def test_analyze_resumes_a_killed_run(ckpts, tmp_path):
    db = tmp_path / "r.duckdb"
    env = {**os.environ, "OPDVIZ_FAULT": "after:5", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "opdviz.cli", "compute", str(ckpts["base"]), str(ckpts["opd"]),
                           "--name", "opd", "--method", "OPD", "--db", str(db), "--device", "cpu", "--no-progress"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode != 0                              # killed after 5 tensors
    partial = opdviz.open(db).metrics(runs="opd")
    assert 0 < partial["tensor"].nunique()
    run = opdviz.analyze(ckpts["base"], ckpts["opd"], db=db, name="opd", method="OPD", device="cpu", progress=False)
    assert run.status == "done" and run.n_done == run.n_tensors
    fresh = opdviz.analyze(ckpts["base"], ckpts["opd"], db=tmp_path / "f.duckdb", name="opd", method="OPD",
                           device="cpu", progress=False)
    pd.testing.assert_frame_equal(opdviz.open(db).metrics(), opdviz.open(fresh.db).metrics(), check_exact=True)


@pytest.mark.parametrize("kwargs, words", [
    ({"spectrm": "exact"}, ["unknown option spectrm", "valid options:", "spectrum", "abs_eps"]),
    ({"abs_eps": "1e-5"}, ["abs_eps", "float"]),
    ({"split_fused": "no"}, ["split_fused", "bool"]),
    ({"map_size": 1.5}, ["map_size", "int"]),
    ({"device": "tpu"}, ["device", "auto, cpu or cuda"]),
    ({"criterion": "abs_1e-3"}, ["criterion", "abs_1e-5"]),
    ({"name": ["a", "b"]}, ["2 names for 1"]),
    ({"method": ["OPD", "RL"]}, ["2 labels for 1"]),
])
def test_analyze_checks_options_before_any_work(ckpts, tmp_path, kwargs, words):
    db = tmp_path / "x.duckdb"
    with pytest.raises(OptionsError) as err:
        opdviz.analyze(ckpts["base"], ckpts["opd"], db=db, progress=False, **kwargs)
    for w in words:
        assert w in str(err.value)
    assert not db.exists() and not Path(str(db) + ".staging").exists()


def test_analyze_needs_distinct_names(ckpts, tmp_path):
    with pytest.raises(OptionsError, match="must differ"):
        opdviz.analyze(ckpts["base"], [ckpts["opd"], ckpts["rl"]], db=tmp_path / "x.duckdb", name=["a", "a"],
                       progress=False)


def test_options_accept_lists_for_tuples():
    opts = opdviz.api.make_options(abs_eps=[1e-6, 1e-5], angle_ks=[16], spectrum="approx")
    assert opts.abs_eps == (1e-6, 1e-5) and opts.angle_ks == (16,) and opts.spectrum == "approx"


# ------------------------------------------------------------------------------------------ open
def test_open_refuses_a_missing_store_and_creates_nothing(tmp_path):
    path = tmp_path / "none" / "missing.duckdb"
    with pytest.raises(StoreError, match="no opdviz store at .*opdviz.analyze"):
        opdviz.open(path)
    assert not path.parent.exists()


def test_open_refuses_a_folder(tmp_path):
    with pytest.raises(StoreError, match="is a folder"):
        opdviz.open(tmp_path)


@pytest.mark.parametrize("content", [b"", b"just some text, not a database\n" * 10])
def test_open_refuses_a_file_that_is_not_duckdb(tmp_path, content):
    path = tmp_path / "x.duckdb"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="not a DuckDB file"):
        opdviz.open(path)
    assert path.read_bytes() == content


def test_open_refuses_a_duckdb_file_of_another_program(tmp_path):
    import duckdb

    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE sales (id INTEGER)")
    con.close()
    stamp = path.stat().st_mtime_ns
    with pytest.raises(StoreError, match="not an opdviz store"):
        opdviz.open(path)
    assert path.stat().st_mtime_ns == stamp


def test_open_is_read_only(db):
    store = opdviz.open(db)
    assert not any(hasattr(store, name) for name in ("write", "delete_run", "fold", "query"))
    before = {p: p.stat().st_mtime_ns for p in Path(db).parent.rglob("*")}
    store.runs(), store.metrics(runs="opd"), store.figure("sparsity.layerwise")
    assert {p: p.stat().st_mtime_ns for p in Path(db).parent.rglob("*")} == before


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_is_the_export(db, ckpts):
    df = opdviz.open(db).metrics()
    assert list(df.columns) == COLUMNS and str(df["layer"].dtype) == "Int64" and df["value"].dtype == np.float64
    # an independent reference: the exact-criterion sparsity of one tensor from the raw bf16 bits
    b, p = _state(ckpts["base"]), _state(ckpts["opd"])
    name = "model.layers.1.mlp.down_proj.weight"
    ref = float(np.mean(b[name].view(torch.int16).numpy() == p[name].view(torch.int16).numpy()))
    row = df[(df["run"] == "opd") & (df["tensor"] == name) & (df["metric"] == "sparsity_exact")]
    assert len(row) == 1 and row["value"].iloc[0] == pytest.approx(ref, abs=1e-12)


SELECTIONS = [
    {},
    {"runs": ["rl"]},
    {"methods": "OPD"},
    {"layers": [1]},
    {"layers": 0, "modules": ["q", "down"]},
    {"blocks": ["ffn"], "metrics": ["sparsity_exact", "rel_change"]},
    {"runs": "opd", "modules": "k", "metrics": "sparsity_*"},
    {"towers": "text", "blocks": "attn", "layers": [0, 1], "metrics": ["stable_rank", "top*_energy"]},
]


def _cli_args(sel: dict) -> list[str]:
    flags = {"runs": "--run", "methods": "--method", "layers": "--layer", "modules": "--module",
             "blocks": "--block", "metrics": "--metric", "towers": "--tower"}
    out = []
    for key, values in sel.items():
        for v in (values if isinstance(values, list) else [values]):
            out += [flags[key], str(v)]
    return out


@pytest.mark.parametrize("sel", SELECTIONS, ids=lambda s: ",".join(s) or "all")
def test_cli_and_api_give_the_same_rows(db, tmp_path, sel):
    api = opdviz.open(db).metrics(**sel)
    out = tmp_path / "m.parquet"
    assert cli.main(["metrics", "--db", str(db), "--format", "parquet", "-o", str(out), *_cli_args(sel)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out), api, check_exact=True)
    # the filter, checked against pandas on the whole export
    full = opdviz.open(db).metrics()
    keep = pd.Series(True, index=full.index)
    for key, col in (("runs", "run"), ("methods", "method"), ("modules", "module"), ("blocks", "block"),
                     ("towers", "tower"), ("layers", "layer")):
        if key in sel:
            keep &= full[col].isin(sel[key] if isinstance(sel[key], list) else [sel[key]])
    if "metrics" in sel:
        import fnmatch

        pats = sel["metrics"] if isinstance(sel["metrics"], list) else [sel["metrics"]]
        keep &= full["metric"].map(lambda m: any(fnmatch.fnmatchcase(m, p) for p in pats))
    expected = full[keep].reset_index(drop=True)
    assert len(expected) > 0
    pd.testing.assert_frame_equal(api, expected, check_exact=True)


def test_cli_csv_is_the_same_rows(db, capsys):
    assert cli.main(["metrics", "--db", str(db), "--run", "opd", "--layer", "0-1", "--module", "v"]) == 0
    import io

    csv = pd.read_csv(io.StringIO(capsys.readouterr().out))
    api = opdviz.open(db).metrics(runs="opd", layers=range(0, 2), modules="v")
    pd.testing.assert_frame_equal(api, opdviz.open(db).metrics(runs=["opd"], layers=np.arange(2), modules=["v"]))
    assert len(csv) == len(api) > 0
    assert list(csv["tensor"]) == list(api["tensor"]) and list(csv["metric"]) == list(api["metric"])
    np.testing.assert_array_equal(csv["value"].to_numpy(), api["value"].to_numpy())   # repr round-trips


@pytest.mark.parametrize("sel, words", [
    ({"runs": "nope"}, ["no run 'nope'", "opd", "rl"]),
    ({"modules": ["q", "qq"]}, ["no module 'qq'", "down"]),
    ({"layers": 7}, ["no layer 7", "layers: 0, 1"]),
    ({"metrics": "sparsity_nope*"}, ["no metric 'sparsity_nope*'"]),
    ({"methods": "DPO"}, ["no method 'DPO'", "OPD"]),
    ({"layers": "1"}, ["layers takes integers"]),
])
def test_metrics_names_what_is_unknown(db, sel, words, capsys):
    with pytest.raises(OptionsError) as err:
        opdviz.open(db).metrics(**sel)
    for w in words:
        assert w in str(err.value)


def test_cli_metrics_error_has_no_traceback(db, capsys):
    assert cli.main(["metrics", "--db", str(db), "--module", "qq"]) == 2
    err = capsys.readouterr().err
    assert "no module 'qq'" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ figures
def test_figure_names_are_the_cli_list(capsys):
    assert cli.main(["figures", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == opdviz.figure_names() and len(listed) == len(set(listed)) > 20
    assert {"sparsity.layerwise", "overlap.jaccard", "trajectory.sim_k"} <= set(listed)


def test_every_figure_builds(db):
    store = opdviz.open(db)
    assert store.figure_names() == opdviz.figure_names()
    for name in store.figure_names():
        assert isinstance(store.figure(name), go.Figure), name


def test_figure_filters_select_rows(db):
    store = opdviz.open(db)
    fig = store.figure("sparsity.layerwise", runs="rl", modules=["q", "down"], criterion="exact")
    assert isinstance(fig, go.Figure) and len(fig.data) > 0
    data = store.figure_data("sparsity.layerwise", runs="rl", modules=["q", "down"], criterion="exact")
    assert set(data["run_id"]) == {"rl"} and set(data["module"]) == {"q", "down"}
    # the plotted share of unchanged entries equals the export's sparsity_exact (numel-weighted per layer)
    m = store.metrics(runs="rl", modules=["q", "down"], metrics="sparsity_exact")
    assert len(m) == len(data)
    merged = data.merge(m, on=["layer", "module"])
    np.testing.assert_allclose(merged["sparsity"], merged["value"], rtol=1e-12)
    by_method = store.figure_data("sparsity.layerwise", methods="OPD")
    assert set(by_method["run_id"]) == {"opd"}


@pytest.mark.parametrize("call, words", [
    (lambda s: s.figure("nope"), ["no figure 'nope'", "sparsity.layerwise"]),
    (lambda s: s.figure("sparsity.layerwise", colour="red"), ["unknown figure filter colour", "criterion"]),
    (lambda s: s.figure("sparsity.layerwise", runs="nope"), ["no run named 'nope'", "opd"]),
    (lambda s: s.figure("sparsity.layerwise", layers=[0, 2]), ["consecutive layers"]),
    (lambda s: s.figure("sparsity.layerwise", methods="DPO"), ["no run with method 'DPO'"]),
])
def test_figure_errors_say_what_is_valid(db, call, words):
    with pytest.raises(OptionsError) as err:
        call(opdviz.open(db))
    for w in words:
        assert w in str(err.value)


# ------------------------------------------------------------------------------------------ across runs
def test_overlap_function_and_reader(db, ckpts):
    res = opdviz.overlap(ckpts["base"], ckpts["opd"], ckpts["rl"], db=db, run_a="opd", run_b="rl", progress=False)
    assert isinstance(res, opdviz.OverlapSummary) and res.n_tensors > 0 and res.skipped == 0
    df = opdviz.open(db).overlap("opd", "rl", criterion="exact", by="all")
    assert len(df) == 1 and {"jaccard", "jaccard_baseline", "cov_a", "cov_b_ratio"} <= set(df.columns)
    b, pa, pb = _state(ckpts["base"]), _state(ckpts["opd"]), _state(ckpts["rl"])
    inter = union = 0
    for name in b:
        ma = b[name].view(torch.int16).numpy() != pa[name].view(torch.int16).numpy()
        mb = b[name].view(torch.int16).numpy() != pb[name].view(torch.int16).numpy()
        inter += int(np.sum(ma & mb))
        union += int(np.sum(ma | mb))
    assert df["jaccard"].iloc[0] == pytest.approx(inter / union, rel=1e-12)
    assert not opdviz.open(db).overlap(criterion=None).empty          # every pair, every criterion
    with pytest.raises(OptionsError, match="no overlap of opd and nope"):
        opdviz.open(db).overlap("opd", "nope")
    assert isinstance(opdviz.open(db).figure("overlap.jaccard", run_a="opd", run_b="rl"), go.Figure)


def test_trajectory_function_and_reader(ckpts, tmp_path):
    db = tmp_path / "t.duckdb"
    res = opdviz.trajectory(ckpts["base"], {10: ckpts["rl-step10"], 20: ckpts["rl"]}, db=db, name="rl-traj",
                            method="RL", device="cpu", progress=False)
    assert isinstance(res, opdviz.TrajectorySummary) and res.steps == (10, 20) and res.n_failed == 0
    store = opdviz.open(db)
    assert list(store.trajectories()["trajectory"]) == ["rl-traj"]
    df = store.trajectory("rl-traj", metrics="density_exact")
    assert set(df["step"]) == {10, 20} and set(df["metric"]) == {"density_exact"}
    b, p = _state(ckpts["base"]), _state(ckpts["rl-step10"])
    name = "model.layers.0.self_attn.q_proj.weight"
    ref = float(np.mean(b[name].view(torch.int16).numpy() != p[name].view(torch.int16).numpy()))
    got = df[(df["step"] == 10) & (df["tensor"] == name)]["value"]
    assert len(got) == 1 and got.iloc[0] == pytest.approx(ref, abs=1e-12)
    assert set(store.runs()["run_id"]) == {"rl-traj@10", "rl-traj@20"}
    with pytest.raises(OptionsError, match="no trajectory 'nope'"):
        store.trajectory("nope")


def test_masks_function(ckpts, tmp_path):
    out = tmp_path / "m.safetensors"
    res = opdviz.masks(ckpts["base"], ckpts["opd"], out=out, criterion="exact", packed=True)
    b, p = _state(ckpts["base"]), _state(ckpts["opd"])
    ref = {k: (b[k].view(torch.int16) != p[k].view(torch.int16)) for k in b}
    assert res.tensors == len(ref) and res.changed == sum(int(m.sum()) for m in ref.values())
    back = opdviz.load_masks(out)
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def test_train_only_masked_freezes_the_rest():
    model = torch.nn.Linear(4, 3)
    mask = {"weight": torch.zeros(3, 4, dtype=torch.bool), "bias": torch.ones(3, dtype=torch.bool)}
    mask["weight"][0, 0] = True
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    before = model.weight.detach().clone()
    handle = opdviz.train_only_masked(model, mask, opt)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    changed = model.weight.detach() != before
    assert changed[0, 0] and int(changed.sum()) == 1
    handle.remove()


# ------------------------------------------------------------------------------------------ the package
def test_import_is_light_and_the_names_stay_functions():
    code = ("import sys, opdviz; assert 'torch' not in sys.modules and 'pandas' not in sys.modules; "
            "import opdviz.engine.overlap, opdviz.engine.trajectory, opdviz.engine.masks; "
            "from opdviz.engine.masks import write_masks; "
            "assert callable(opdviz.overlap) and callable(opdviz.trajectory) and callable(opdviz.masks); "
            "assert opdviz.masks.__module__ == 'opdviz.api'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_public_functions_are_documented_and_typed():
    import inspect

    for name in ("analyze", "open", "overlap", "trajectory", "masks", "load_masks", "train_only_masked",
                 "figure_names"):
        fn = getattr(opdviz, name)
        assert fn.__doc__ and len(fn.__doc__) > 60, name
        assert inspect.signature(fn).return_annotation is not inspect.Signature.empty, name
    for name in ("runs", "metrics", "figure", "figure_data", "figure_names", "overlap", "trajectory"):
        assert getattr(opdviz.Results, name).__doc__, name
