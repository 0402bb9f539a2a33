"""The compute job end to end: CLI, stored results, export contract, kill -9 and resume, readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import factory
from opdviz.cli import main as cli
from opdviz.store import Store

REQUIRED = ("sparsity_exact sparsity_abs_1e-8 sparsity_abs_1e-7 sparsity_abs_1e-6 sparsity_abs_1e-5 "
            "sparsity_abs_1e-4 sparsity_relrms_1e-4 sparsity_relrms_1e-3 sparsity_relrms_1e-2 sparsity_bf16_1e-3 "
            "delta_fro base_fro post_fro rel_change delta_max_abs stable_rank effective_rank numerical_rank_1e-5 "
            "top1_energy top16_energy top64_energy principal_proj_10pct principal_proj_left_10pct "
            "principal_proj_right_10pct nss angle_left_mean_sin_k16 lowmag_coverage_10pct "
            "principal_coverage_10pct spectrum_exact").split()
COLUMNS = ["run", "method", "tensor", "tower", "layer", "block", "module", "metric", "value"]


def compute(base, post, db, *extra, env=None) -> subprocess.CompletedProcess:
    """Run ``opdviz compute`` in a child process (as a user would)."""
    cmd = [sys.executable, "-m", "opdviz.cli", "compute", str(base), str(post), "--name", "run1",
           "--method", "OPD", "--db", str(db), "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def export(db, tmp_path, run=None) -> pd.DataFrame:
    out = tmp_path / f"export-{Path(db).stem}.parquet"
    args = ["metrics", "--db", str(db), "--format", "parquet", "-o", str(out)] + (["--run", run] if run else [])
    assert cli(args) == 0
    return pd.read_parquet(out)


@pytest.fixture(scope="module")
def computed(tmp_path_factory, llama_pair):
    db = tmp_path_factory.mktemp("db") / "r.duckdb"
    proc = compute(*llama_pair, db)
    assert proc.returncode == 0, proc.stderr
    return db


def test_export_contract(computed, tmp_path):
    df = export(computed, tmp_path, run="run1")
    assert list(df.columns) == COLUMNS
    names = set(df["metric"])
    assert not set(REQUIRED) - names, f"missing metrics: {set(REQUIRED) - names}"
    q = df[df.tensor == "model.layers.1.self_attn.q_proj.weight"].set_index("metric")["value"]
    assert 0 <= q["sparsity_abs_1e-5"] <= 1 and q["sparsity_exact"] <= q["sparsity_abs_1e-5"] + 1e-12
    assert q["spectrum_exact"] == 1.0
    row = df[df.tensor == "model.layers.1.mlp.down_proj.weight"].iloc[0]
    assert (row["tower"], row["layer"], row["block"], row["module"], row["method"]) == ("text", 1, "ffn", "down", "OPD")
    csv = tmp_path / "m.csv"
    assert cli(["metrics", "--db", str(computed), "--format", "csv", "-o", str(csv)]) == 0
    assert pd.read_csv(csv).shape == df.shape


def test_run_provenance_and_statuses(computed):
    store = Store(computed)
    run = store.run_row("run1")
    assert run["status"] == "done" and run["n_failed"] == 0
    assert run["base_bytes"] > 0 and json.loads(run["versions"])["torch"]
    assert json.loads(run["options"])["criterion"] == "abs_1e-5"
    assert run["device"] == "cpu"
    tensors = store.query("SELECT * FROM tensors WHERE run_id = 'run1'")
    assert (tensors.status == "ok").all()
    assert len(tensors) == len(factory.make_llama_state())


def test_metrics_match_a_direct_float64_computation(computed, llama_pair):
    """A spot check through the whole pipeline (reader → metrics → store → export)."""
    import numpy as np
    from safetensors.torch import load_file

    def tl(folder):
        sd = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            sd.update(load_file(str(f)))
        return sd

    b, p = tl(llama_pair[0]), tl(llama_pair[1])
    name = "model.layers.0.mlp.gate_proj.weight"
    wb, wp = b[name].double().numpy(), p[name].double().numpy()
    d = wp - wb
    store = Store(computed)
    m = store.query("SELECT metric, value FROM metrics WHERE tensor = ?", [name]).set_index("metric")["value"]
    assert m["sparsity_abs_1e-5"] == pytest.approx(np.mean(np.abs(d) <= 1e-5), abs=0)
    assert m["delta_fro"] == pytest.approx(np.linalg.norm(d), rel=1e-6)
    s = np.linalg.svd(d, compute_uv=False)
    assert m["stable_rank"] == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-5)
    assert m["top16_energy"] == pytest.approx((s[:16] ** 2).sum() / (s ** 2).sum(), rel=1e-5)


@pytest.fixture(scope="module")
def bigger_pair(tmp_path_factory):
    cfg = factory.llama_config(layers=4, hidden=96, ffn=256, heads=4, kv_heads=2, vocab=128)
    return factory.make_pair(tmp_path_factory.mktemp("big"), cfg=cfg)


@pytest.mark.parametrize("fault", ["after:5", "torn:7"])
def test_kill_minus_9_then_resume_is_identical(bigger_pair, tmp_path, fault):
    ref_db, db = tmp_path / "ref.duckdb", tmp_path / "killed.duckdb"
    assert compute(*bigger_pair, ref_db).returncode == 0
    killed = compute(*bigger_pair, db, env={"OPDVIZ_FAULT": fault})
    assert killed.returncode == -9
    store = Store(db)
    assert store.run_row("run1")["status"] == "running"
    n_stored = len(store.query("SELECT tensor FROM tensors WHERE parent = ''"))
    assert n_stored == int(fault.split(":")[1]) - (fault.startswith("torn"))
    resumed = compute(*bigger_pair, db)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    a, b = export(ref_db, tmp_path), export(db, tmp_path)
    pd.testing.assert_frame_equal(a, b)
    assert Store(db).run_row("run1")["status"] == "done"
    # a third run has nothing to do and changes nothing
    assert compute(*bigger_pair, db).returncode == 0
    pd.testing.assert_frame_equal(a, export(db, tmp_path))


def test_reader_never_sees_a_torn_tensor_while_the_job_runs(bigger_pair, tmp_path):
    db = tmp_path / "live.duckdb"
    ref = tmp_path / "ref.duckdb"
    assert compute(*bigger_pair, ref).returncode == 0
    per_tensor = Store(ref).query("SELECT tensor, count(*) AS n FROM metrics GROUP BY tensor")
    expected = dict(zip(per_tensor.tensor, per_tensor.n))
    cmd = [sys.executable, "-m", "opdviz.cli", "compute", *map(str, bigger_pair), "--name", "run1",
           "--method", "OPD", "--db", str(db), "--no-progress"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store, reads, seen = Store(db), 0, set()
    while job.poll() is None or reads == 0:
        df = store.query("SELECT m.tensor, count(*) AS n FROM tensors t JOIN metrics m USING (run_id, tensor) "
                         "GROUP BY m.tensor")
        for tensor, n in zip(df.tensor, df.n):
            assert n == expected[tensor], f"{tensor}: {n} of {expected[tensor]} metrics visible"
            seen.add(tensor)
        reads += 1
    out, err = job.communicate()
    assert job.returncode == 0, err
    assert reads > 1
    assert set(expected) == {t for t in Store(db).query("SELECT DISTINCT tensor FROM metrics").tensor}


def test_second_job_on_the_same_run_is_refused(bigger_pair, tmp_path):
    from opdviz.engine.progress import run_lock

    store = Store(tmp_path / "x.duckdb")
    with run_lock(store, "run1"):
        proc = compute(*bigger_pair, store.db_path)
    assert proc.returncode == 2
    assert "being computed right now" in proc.stderr and "Traceback" not in proc.stderr


def test_same_name_other_inputs_is_refused(computed, bigger_pair):
    proc = compute(*bigger_pair, computed)
    assert proc.returncode == 2
    assert "--overwrite" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("make_bad, words", [
    (lambda d: (d / "x.bin").write_bytes(b"PK\x03\x04" + b"\0" * 64) and d / "x.bin", "pickle"),
    (lambda d: (d / "x.safetensors").write_bytes((10 ** 12).to_bytes(8, "little") + b"{}") and d / "x.safetensors", "header"),
    (lambda d: d / "missing", "no such file"),
])
def test_bad_input_is_a_clear_cli_error(llama_pair, tmp_path, make_bad, words):
    bad = make_bad(tmp_path)
    proc = compute(llama_pair[0], bad, tmp_path / "x.duckdb")
    assert proc.returncode == 2
    assert words in proc.stderr.lower() and "Traceback" not in proc.stderr
