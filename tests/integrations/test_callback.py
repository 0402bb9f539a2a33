"""OpdvizCallback: a live trajectory from a transformers.Trainer run (the example, on CPU), a killed run, the page."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from opdviz.engine.live import live_dir, read_status, training_log  # noqa: E402
from opdviz.store import Store  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_with_callback.py"


def train(db: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the example. The analysis worker inherits stderr, so this returns once the worker is done too."""
    return subprocess.run([sys.executable, str(EXAMPLE), "--db", str(db), *args], capture_output=True, text=True,
                          cwd=db.parent, timeout=600, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})})


def trainer_logs(stdout: str) -> dict[int, dict]:
    """The Trainer's printed per-step logs ({'loss': '4.8', 'learning_rate': …}) by step (logging_steps=1)."""
    logs = [ast.literal_eval(line) for line in stdout.splitlines() if line.startswith("{'loss'")]
    return {i + 1: {k: float(v) for k, v in d.items()} for i, d in enumerate(logs)}


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    db = tmp_path_factory.mktemp("live") / "s.duckdb"
    res = train(db, "--steps", "4", "--every", "2", "--name", "tiny")
    assert res.returncode == 0, res.stderr[-3000:]
    return db, res


def test_example_stores_a_trajectory_with_loss_and_lr(live_run):
    db, res = live_run
    store = Store(db)
    runs = store.runs().set_index("run_id")
    assert set(runs.index) == {"tiny@2", "tiny@4"}
    assert (runs["status"] == "done").all() and set(runs["trajectory"]) == {"tiny"}
    assert sorted(runs["step"]) == [2, 4]
    logs = trainer_logs(res.stdout)
    log = training_log(store, "tiny").set_index("step")
    for step in (2, 4):
        assert log.at[step, "loss_step"] == step
        assert log.at[step, "loss"] == pytest.approx(logs[step]["loss"], rel=1e-3)
        assert log.at[step, "learning_rate"] == pytest.approx(logs[step]["learning_rate"], rel=1e-3, abs=1e-12)
    traj = store.query("SELECT DISTINCT step FROM trajectory WHERE trajectory = 'tiny'")
    assert sorted(traj["step"]) == [2, 4]          # the trajectory metrics were computed at the end
    status = read_status(db, "tiny")
    assert status["status"] == "done" and status["steps_done"] == [2, 4] and status["train_step"] == 4
    folder = live_dir(db, "tiny")
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["base.safetensors", "step-4.safetensors"]


def test_stored_update_matches_the_snapshots(live_run):
    """delta_fro of the stored step against a float64 numpy reference on the kept snapshots."""
    db, _ = live_run
    folder = live_dir(db, "tiny")
    base, post = load_file(str(folder / "base.safetensors")), load_file(str(folder / "step-4.safetensors"))
    assert set(base) == set(post) and "model.embed_tokens.weight" in base
    m = Store(db).query("SELECT tensor, value FROM metrics WHERE run_id = 'tiny@4' AND metric = 'delta_fro'")
    got = dict(zip(m["tensor"], m["value"]))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        want = np.linalg.norm(post[name].astype(np.float64) - base[name].astype(np.float64))
        assert want > 0
        assert got[name] == pytest.approx(want, rel=1e-6)


def test_killed_training_keeps_what_is_stored(tmp_path):
    db = tmp_path / "s.duckdb"
    res = train(db, "--steps", "12", "--every", "2", "--name", "killed", env={"OPDVIZ_FAULT": "train-kill:2"})
    assert res.returncode == -signal.SIGKILL
    status = read_status(db, "killed")
    assert status["status"] == "interrupted", status
    assert status["steps_done"] == [2]
    assert "opdviz trajectory" in status["message"] and "step-2.safetensors" in status["message"]
    runs = Store(db).runs()
    assert list(runs["run_id"]) == ["killed@2"] and list(runs["status"]) == ["done"]
    n = Store(db).query("SELECT count(*) AS n FROM metrics WHERE run_id = 'killed@2'")["n"][0]
    assert n > 100


def test_trajectory_page_shows_a_running_trajectory(live_run, monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    from opdviz.engine.live import write_status

    db, _ = live_run
    monkeypatch.setenv("OPDVIZ_DB", str(db))
    monkeypatch.setenv("OPDVIZ_PREWARM", "0")
    sys.path.insert(0, str(ROOT))
    write_status(db, "tiny", status="running", pid=os.getpid(), train_step=6, steps_queued=[6])
    try:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.run()
        at.switch_page("pages/trajectory.py").run()
        assert not at.exception, [e.message for e in at.exception]
        text = " ".join(i.value for i in at.info)
        assert "Training in progress" in text and "step 6" in text and "2 snapshot(s) analysed" in text
        assert at.get("plotly_chart")
        assert any("Training log" in e.label for e in at.expander)
    finally:
        write_status(db, "tiny", status="done", pid=0, train_step=4, steps_queued=[])


def test_missing_transformers_names_the_extra(monkeypatch):
    from opdviz.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "transformers", None)
    for mod in [m for m in sys.modules if m.startswith("opdviz.integrations")]:
        monkeypatch.delitem(sys.modules, mod)
    with pytest.raises(MissingExtraError, match=r"opdviz\[train\]"):
        import opdviz.integrations  # noqa: F401
    with pytest.raises(ImportError):      # an ImportError too, for `try: import … except ImportError`
        import opdviz.integrations  # noqa: F401
