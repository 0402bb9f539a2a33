"""Batch files: validated up front with every problem listed; runs as one job with the local executor."""

from __future__ import annotations

import json

import pytest

from opdviz.engine.batch import load_batch
from opdviz.cli import main as cli
from opdviz.errors import OptionsError
from opdviz.store import Store


def write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_every_problem_is_listed_before_anything_runs(llama_pair, tmp_path):
    bad = write(tmp_path / "b.json", {
        "options": {"spectrum": "exact", "abs_eps": "1e-5", "colour": 1},
        "bases": [{"path": str(llama_pair[0]), "postz": [],
                   "posts": [{"name": "a", "path": str(tmp_path / "nope"), "methd": "OPD"},
                             {"name": "a", "path": str(llama_pair[1])}, {"name": "a", "path": str(llama_pair[1])}],
                   "trajectories": [{"name": "t", "checkpoints": [{"step": "ten", "path": str(llama_pair[1])}]}]}],
    })
    with pytest.raises(OptionsError) as err:
        load_batch(bad, tmp_path / "x.duckdb")
    text = str(err.value)
    for needle in ("options: unknown key 'colour'", "options.abs_eps: expected a list of float",
                   "bases[0]: unknown key 'postz'", "bases[0].posts[0]: unknown key 'methd'",
                   "bases[0].posts[0].path", "nope", "bases[0].trajectories[0].checkpoints[0].step",
                   "run name 'a' is used more than once"):
        assert needle in text, needle
    assert not (tmp_path / "x.duckdb").exists() and not (tmp_path / "x.duckdb.staging").exists()


@pytest.mark.parametrize("text, needle", [
    ("bases: [", "not valid YAML"),
    ("- just a list", "expected a mapping"),
    ("options: {}", "missing key 'bases'"),
    ("bases: []", "non-empty list of bases"),
])
def test_malformed_files(tmp_path, text, needle):
    path = tmp_path / "b.yaml"
    path.write_text(text)
    with pytest.raises(OptionsError, match=needle):
        load_batch(path, tmp_path / "x.duckdb")


def test_batch_command_runs_the_listed_pairs_locally(llama_pair, tmp_path, capsys):
    path = tmp_path / "b.yaml"
    path.write_text(f"""
options: {{include: "layers\\\\.0\\\\.mlp"}}
bases:
  - path: {llama_pair[0]}
    posts:
      - {{name: one, path: {llama_pair[1]}, method: OPD}}
      - {{name: two, path: {llama_pair[1]}, method: RL}}
""")
    db = tmp_path / "b.duckdb"
    assert cli(["batch", str(path), "--db", str(db), "--check"]) == 0
    assert "2 runs" in capsys.readouterr().out and not db.exists()
    assert cli(["batch", str(path), "--db", str(db), "--no-progress"]) == 0
    runs = Store(db).query("SELECT run_id, method, status, n_tensors, device FROM runs ORDER BY run_id")
    assert runs.values.tolist() == [["one", "OPD", "done", 3, "cpu"], ["two", "RL", "done", 3, "cpu"]]
    a = Store(db).query("SELECT tensor, metric, value FROM metrics WHERE run_id = 'one' ORDER BY tensor, metric")
    b = Store(db).query("SELECT tensor, metric, value FROM metrics WHERE run_id = 'two' ORDER BY tensor, metric")
    assert len(a) and a.equals(b)
