"""The Ray executor on a local Ray instance: same results as the local loop, batches in one pool,
a worker that dies is retried, and a clear error without Ray. Skipped when Ray is not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

import factory  # noqa: E402
from opdviz.engine.batch import load_batch, run_batch  # noqa: E402
from opdviz.cli import main as cli  # noqa: E402
from opdviz.engine.local import LocalExecutor, Work  # noqa: E402
from opdviz.engine.raycluster import RayExecutor, plan_tasks  # noqa: E402
from opdviz.engine.runner import JobSpec, run_job  # noqa: E402
from opdviz.store.queries import export_rows  # noqa: E402
from opdviz.store import Store, slug  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole module (starting one costs seconds), shut down at the end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def spec(pair, db, name="run1", **kw) -> JobSpec:
    return JobSpec(base=pair[0], post=pair[1], run_id=name, method="OPD", db=Path(db), **kw)


def tasks_state(db, run_id) -> dict:
    return json.loads((Store(db).staging / "progress" / f"{slug(run_id)}.json").read_text())


@pytest.fixture(scope="module")
def local_db(llama_pair, tmp_path_factory):
    db = tmp_path_factory.mktemp("local") / "l.duckdb"
    run_job(spec(llama_pair, db), progress=False)
    return db


def test_ray_matches_local(ray_local, llama_pair, local_db, tmp_path):
    db = tmp_path / "r.duckdb"
    row = run_job(spec(llama_pair, db), progress=False, executor=RayExecutor())
    assert row["status"] == "done" and row["n_failed"] == 0 and row["device"] == "ray:cpu"
    pd.testing.assert_frame_equal(export_rows(Store(local_db)), export_rows(Store(db)), check_exact=True)
    arrays = "SELECT tensor, name, values FROM arrays ORDER BY tensor, name"
    a, b = Store(local_db).query(arrays), Store(db).query(arrays)
    assert len(a) and a[["tensor", "name"]].equals(b[["tensor", "name"]])
    assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a["values"], b["values"]))
    state = tasks_state(db, "run1")
    assert state["status"] == "done" and state["tasks"]["done"] == state["tasks"]["total"] > 1
    assert state["tasks"]["retried"] == 0
    # rerun: nothing left to do, nothing changes (resume logic is the job's, not the executor's)
    again = run_job(spec(llama_pair, db), progress=False, executor=RayExecutor())
    assert again["status"] == "done"
    pd.testing.assert_frame_equal(export_rows(Store(local_db)), export_rows(Store(db)), check_exact=True)


def test_a_worker_that_dies_is_retried_and_results_are_identical(ray_local, llama_pair, local_db, tmp_path,
                                                                 monkeypatch):
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("OPDVIZ_FAULT", f"worker-once:{marker}")
    db = tmp_path / "r.duckdb"
    assert cli(["compute", *map(str, llama_pair), "--name", "run1", "--method", "OPD", "--db", str(db),
                "--no-progress", "--executor", "ray"]) == 0
    assert marker.exists(), "the fault was not injected"
    state = tasks_state(db, "run1")
    assert state["tasks"]["retried"] == 1 and state["tasks"]["done"] == state["tasks"]["total"]
    assert Store(db).run_row("run1")["status"] == "done"
    pd.testing.assert_frame_equal(export_rows(Store(local_db)), export_rows(Store(db)), check_exact=True)


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory):
    """A base, one post-trained checkpoint and a two-step trajectory, as a YAML batch with relative paths."""
    root = tmp_path_factory.mktemp("batch")
    cfg = factory.llama_config()
    base = factory.make_llama_state(cfg, seed=0)
    factory.save_checkpoint(base, root / "base", shards=2, config=cfg)
    factory.save_checkpoint(factory.post_train(base, seed=1), root / "opd", shards=3, config=cfg)
    step1 = factory.post_train(base, seed=2, density=0.1)
    factory.save_checkpoint(step1, root / "rl" / "checkpoint-10", config=cfg)
    factory.save_checkpoint(factory.post_train(step1, seed=3, density=0.1), root / "rl" / "checkpoint-20", config=cfg)
    path = root / "batch.yaml"
    path.write_text("""
options: {spectrum: exact, angle_ks: [16]}
bases:
  - path: base
    posts:
      - {name: opd, path: opd, method: OPD}
    trajectories:
      - name: rl
        method: RL
        checkpoints:
          - {step: 20, path: rl/checkpoint-20}
          - {step: 10, path: rl/checkpoint-10}
""")
    return path


def test_batch_with_a_trajectory_on_ray_matches_local(ray_local, batch_file, tmp_path):
    dbs = {}
    for name, executor in (("local", LocalExecutor()), ("ray", RayExecutor())):
        db = tmp_path / f"{name}.duckdb"
        batch = load_batch(batch_file, db)
        assert [s.run_id for s in batch.specs] == ["opd", "rl@10", "rl@20"]
        rows = run_batch(batch, executor=executor, progress=False)
        assert [r["status"] for r in rows] == ["done"] * 3
        dbs[name] = Store(db)
    a, b = export_rows(dbs["local"]), export_rows(dbs["ray"])
    assert set(a["run"]) == {"opd", "rl@10", "rl@20"}
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    runs = dbs["ray"].query("SELECT run_id, coalesce(trajectory, '-') AS t, coalesce(step, -1) AS s, device "
                            "FROM runs ORDER BY run_id")
    assert runs.values.tolist() == [["opd", "-", -1, "ray:cpu"], ["rl@10", "rl", 10, "ray:cpu"],
                                    ["rl@20", "rl", 20, "ray:cpu"]]
    traj = "SELECT step, tensor, metric, value FROM trajectory ORDER BY step, tensor, metric"
    ta, tb = dbs["local"].query(traj), dbs["ray"].query(traj)
    assert len(ta) and set(ta["step"]) == {10, 20}
    pd.testing.assert_frame_equal(ta, tb, check_exact=True)


def test_tasks_are_balanced_by_bytes_and_keep_stored_order(llama_pair):
    from opdviz.io.reader import Checkpoint, plan_pairs

    base, post = Checkpoint.open(llama_pair[0]), Checkpoint.open(llama_pair[1])
    items = [i for i in plan_pairs(base, post) if i.status == "ok"]
    works = [Work(0, llama_pair[0], llama_pair[1], None, items, {}), Work(1, llama_pair[0], llama_pair[1], None,
                                                                           items[:3], {})]
    groups = plan_tasks(works, 6)
    assert sorted(i.name for k, g in groups if k == 0 for i in g) == sorted(i.name for i in items)
    size = [sum(i.base.nbytes + i.post.nbytes for i in g) for _, g in groups]
    assert size == sorted(size, reverse=True)
    total = sum(size)
    biggest = max(i.base.nbytes + i.post.nbytes for i in items)
    assert max(size) <= max(total / 6, biggest)
    order = {i.name: n for n, i in enumerate(items)}
    for key, g in groups:           # contiguous runs of the stored order
        pos = [order[i.name] for i in g]
        assert pos == list(range(pos[0], pos[0] + len(pos)))


def test_executor_ray_without_ray_says_how_to_install(llama_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)      # `import ray` now raises ImportError
    code = cli(["compute", *map(str, llama_pair), "--name", "x", "--db", str(tmp_path / "x.duckdb"),
                "--no-progress", "--executor", "ray"])
    assert code == 2
    assert 'pip install ".[ray]"' in capsys.readouterr().err
    assert not (tmp_path / "x.duckdb").exists()
