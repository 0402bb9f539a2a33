"""Hostile input: checkpoint folders that reach outside themselves, parsers pushed past their limits,
options that make no sense, and text that a spreadsheet would run. Each case asserts the message, the
exit code, and that nothing else changed (no store created, the stored runs untouched, the outside
file's bytes nowhere in the store or the export)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import factory
from opdviz.cli import main as cli
from opdviz.views.csvsafe import csv_safe, neutralise, to_csv
from opdviz.errors import CheckpointError, OptionsError
from opdviz.views.export import data_bytes
from opdviz.engine.provenance import training_metadata
from opdviz.options import AnalysisOptions, check_label
from opdviz.io.reader import Checkpoint
from opdviz.io.safefiles import scan_json
from opdviz.store import Store

SECRET = b"TOP-SECRET-5f3a9c"          # the content of a file outside every checkpoint folder
CFG = factory.llama_config(layers=1, hidden=16, ffn=32, heads=2, kv_heads=1, vocab=24)


# ------------------------------------------------------------------------------------------ helpers

def _pair(root: Path, shards: int = 1) -> tuple[Path, Path]:
    return factory.make_pair(root, cfg=CFG, base_shards=shards, post_shards=shards)


def _outside(tmp_path: Path, name: str = "secret.json", content: bytes | None = None) -> Path:
    p = tmp_path / "outside" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if content is not None else json.dumps({"accuracy": SECRET.decode()}).encode())
    return p


def _files(db: Path) -> dict[str, str]:
    """Every file of a store (the .duckdb file and its staging folder) → sha256 of its bytes."""
    paths = [db] if db.exists() else []
    staging = Path(str(db) + ".staging")
    if staging.exists():
        paths += sorted(p for p in staging.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _all_bytes(db: Path) -> bytes:
    return b"".join(Path(p).read_bytes() for p in _files(db))


def _no_store(db: Path) -> None:
    assert not db.exists() and not Path(str(db) + ".staging").exists(), "a store or staging folder was created"


def _run(args, capsys) -> tuple[int, str]:
    """The CLI in-process (same code path as the console script): exit code and stderr."""
    rc = cli([str(a) for a in args])
    return rc, capsys.readouterr().err


def _compute(base, post, db, *extra):
    return ["compute", base, post, "--db", db, "--no-progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return _pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def stored(tmp_path_factory, pair) -> Path:
    """A store holding one finished run: failing commands against it must leave it byte-identical."""
    db = tmp_path_factory.mktemp("stored") / "s.duckdb"
    assert cli([str(a) for a in _compute(*pair, db, "--name", "kept", "--method", "OPD")]) == 0
    return db


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


# -------------------------------------------------------------------- 2. nothing outside leaks in

@pytest.mark.parametrize("side", ["config.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("where", ["outside", "inside"])
def test_symlinked_side_file_is_refused(tmp_path, pair, side, where):
    folder = _copy(pair[0], tmp_path / "ck") if side == "config.json" else _pair(tmp_path / "sh", shards=2)[0]
    real = folder / side
    if where == "outside":
        target = _outside(tmp_path, content=real.read_bytes())
    else:                                           # a symlink to a file of the folder itself: refused too
        target = folder / f"copy-of-{side}"
        target.write_bytes(real.read_bytes())
    real.unlink()
    real.symlink_to(target)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    msg = str(e.value)
    assert side in msg and "symlink" in msg and f"pointing {where} " in msg and "refusing" in msg, msg
    assert str(target) not in msg and SECRET.decode() not in msg


@pytest.mark.parametrize("where", ["outside", "inside"])
@pytest.mark.parametrize("layout", ["single", "shard"])
def test_symlinked_weights_are_refused(tmp_path, where, layout):
    folder = _pair(tmp_path / "p", shards=1 if layout == "single" else 2)[1]
    name = "model.safetensors" if layout == "single" else "model-00001-of-00002.safetensors"
    data = (folder / name).read_bytes()
    target = _outside(tmp_path, "w.safetensors", data) if where == "outside" else folder / "real.safetensors"
    target.write_bytes(data)
    (folder / name).unlink()
    (folder / name).symlink_to(target)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    assert name in str(e.value) and "symlink" in str(e.value) and where in str(e.value)


@pytest.mark.parametrize("shard", ["../outside/w.safetensors", "/etc/passwd", "sub/w.safetensors", ".."])
def test_index_pointing_outside_is_refused(tmp_path, shard):
    folder = _pair(tmp_path / "p", shards=2)[0]
    _outside(tmp_path, "w.safetensors", (folder / "model-00001-of-00002.safetensors").read_bytes())
    (folder / "sub").mkdir()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: shard for k in index["weight_map"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    assert "not a plain file name" in str(e.value) and repr(shard) in str(e.value)


def test_a_fifo_as_config_is_refused_without_blocking(tmp_path, pair):
    folder = _copy(pair[0], tmp_path / "ck")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")          # reading it would block forever
    with pytest.raises(CheckpointError, match="config.json: is not a regular file"):
        Checkpoint.open(folder)


def test_shard_swapped_for_a_symlink_after_open_is_not_read(tmp_path, pair):
    folder = _copy(pair[1], tmp_path / "ck")
    shard = folder / "model.safetensors"
    with Checkpoint.open(folder) as ck:
        name = next(iter(ck.infos))
        outside = _outside(tmp_path, "w.safetensors", shard.read_bytes())
        shard.unlink()
        shard.symlink_to(outside)
        with pytest.raises(CheckpointError, match="symlink"):
            ck.load(name)


def test_symlinked_metrics_json_is_ignored_with_a_warning_and_never_stored(tmp_path, pair, capsys):
    post = _copy(pair[1], tmp_path / "post")
    outside = _outside(tmp_path)
    original = outside.read_bytes()
    (post / "metrics.json").symlink_to(outside)
    db = tmp_path / "m.duckdb"
    assert cli([str(a) for a in _compute(pair[0], post, db, "--name", "r", "--method", "RL")]) == 0
    out = capsys.readouterr()
    Store(db).fold(wait=30)
    assert json.loads(Store(db).runs().set_index("run_id").loc["r", "extra"]) == {}
    assert SECRET not in _all_bytes(db)
    export = tmp_path / "e.csv"
    assert cli(["metrics", "--db", str(db), "-o", str(export)]) == 0
    assert SECRET not in export.read_bytes()
    assert "ignoring the training metadata" in out.out and "metrics.json" in out.out
    assert outside.read_bytes() == original                        # the foreign file is untouched


def test_refused_metrics_json_warns(tmp_path, pair):
    post = _copy(pair[1], tmp_path / "post")
    (post / "metrics.json").symlink_to(_outside(tmp_path))
    warnings = []
    assert training_metadata(post, warnings.append) == {}
    assert len(warnings) == 1 and "metrics.json" in warnings[0] and "symlink" in warnings[0]
    assert SECRET.decode() not in warnings[0]


def test_symlinked_step_folder_of_a_trajectory_is_refused(tmp_path, pair, capsys):
    run = tmp_path / "run"
    _copy(pair[1], run / "checkpoint-10")
    (run / "checkpoint-20").symlink_to(_copy(pair[1], tmp_path / "outside" / "ck"))
    db = tmp_path / "t.duckdb"
    rc, err = _run(["trajectory", "--db", db, pair[0], run, "--name", "t", "--method", "RL", "--no-progress"],
                   capsys)
    assert rc == 2 and "checkpoint-20 is a symlink" in err and "--steps" in err, err
    _no_store(db)


def test_hf_cache_layout_is_still_followed(tmp_path, pair):
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in pair[0].iterdir():
        blob = repo / "blobs" / hashlib.sha1(f.name.encode()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    with Checkpoint.open(snap) as ck, Checkpoint.open(pair[0]) as ref:
        assert ck.config == ref.config and list(ck.infos) == list(ref.infos)


# ---------------------------------------------------------------------------- 3. parsers have limits

def _deep(n: int = 200_000) -> bytes:
    return b'{"a":' + b"[" * n + b"]" * n + b"}"


def _header_file(path: Path, header_json: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header_json)) + header_json + data)
    return path


@pytest.mark.parametrize("kind", ["config.json", "model.safetensors.index.json", "header"])
def test_deep_json_is_a_clear_error(tmp_path, kind):
    folder = _pair(tmp_path / "p", shards=2 if kind.endswith("index.json") else 1)[0]
    if kind == "header":
        _header_file(folder / "model.safetensors", _deep())
        name = "model.safetensors"
    else:
        (folder / kind).write_bytes(_deep())
        name = kind
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    assert name in str(e.value) and "nested deeper than 64 levels" in str(e.value)


def test_deep_json_through_the_cli_exits_2_without_a_store(tmp_path, pair):
    folder = _copy(pair[1], tmp_path / "post")
    (folder / "config.json").write_bytes(_deep())
    db = tmp_path / "x.duckdb"
    proc = subprocess.run([sys.executable, "-m", "opdviz.cli", *map(str, _compute(pair[0], folder, db))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "config.json" in proc.stderr and "nested deeper" in proc.stderr and "Traceback" not in proc.stderr
    _no_store(db)


def test_deep_metrics_json_is_ignored_with_a_warning(tmp_path, pair):
    post = _copy(pair[1], tmp_path / "post")
    (post / "metrics.json").write_bytes(_deep())
    warnings = []
    assert training_metadata(post, warnings.append) == {}
    assert "nested deeper" in warnings[0]


def test_oversized_json_side_file_is_refused(tmp_path, pair, monkeypatch):
    folder = _copy(pair[0], tmp_path / "ck")
    (folder / "config.json").write_text(json.dumps({**CFG, "pad": "x" * 3000}))
    monkeypatch.setenv("OPDVIZ_MAX_JSON_MB", "0.002")
    with pytest.raises(CheckpointError, match=r"config.json: larger than 0.002 MB.*OPDVIZ_MAX_JSON_MB"):
        Checkpoint.open(folder)


def test_oversized_header_is_refused(tmp_path, monkeypatch):
    entries = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(100)}
    path = _header_file(tmp_path / "x.safetensors", json.dumps(entries).encode(), b"\0" * 400)
    assert len(Checkpoint.open(path).infos) == 100
    monkeypatch.setenv("OPDVIZ_MAX_HEADER_MB", "0.001")
    with pytest.raises(CheckpointError, match=r"x.safetensors: header length \d+ bytes exceeds the cap of 0.001 MB set by OPDVIZ_MAX_HEADER_MB"):
        Checkpoint.open(path)


def test_header_over_the_format_cap_is_refused_before_reading_it(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the safetensors cap of 100 MB"):
        Checkpoint.open(path)


def test_too_many_tensors_are_refused_before_parsing(tmp_path, monkeypatch):
    # 1.4 M empty tensors took 27 s and 1.6 GB before the cap; 30 against a cap of 20 shows the rule
    entries = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(30)}
    path = _header_file(tmp_path / "x.safetensors", json.dumps(entries).encode())
    monkeypatch.setenv("OPDVIZ_MAX_TENSORS", "20")
    with pytest.raises(CheckpointError, match=r"lists 30 tensor entries, more than the 21 allowed \(OPDVIZ_MAX_TENSORS\)"):
        Checkpoint.open(path)


def test_tensor_cap_counts_all_shards_together(tmp_path, monkeypatch):
    folder = _pair(tmp_path / "p", shards=2)[0]
    n = len(Checkpoint.open(folder).infos)
    monkeypatch.setenv("OPDVIZ_MAX_TENSORS", str(n - 1))
    with pytest.raises(CheckpointError, match="OPDVIZ_MAX_TENSORS"):
        Checkpoint.open(folder)
    monkeypatch.setenv("OPDVIZ_MAX_TENSORS", str(n))
    assert len(Checkpoint.open(folder).infos) == n


def test_header_with_too_many_values_is_refused(tmp_path, monkeypatch):
    entries = {"t": {"dtype": "F32", "shape": [1] * 400, "data_offsets": [0, 4]}}
    path = _header_file(tmp_path / "x.safetensors", json.dumps(entries).encode(), b"\0" * 4)
    monkeypatch.setenv("OPDVIZ_MAX_TENSORS", "10")            # 320 values allowed
    with pytest.raises(CheckpointError, match="JSON values"):
        Checkpoint.open(path)


def test_duplicate_key_in_a_header_is_found(tmp_path):
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    path = _header_file(tmp_path / "x.safetensors", raw, b"\0" * 8)
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        Checkpoint.open(path)


@pytest.mark.parametrize("env, value", [("OPDVIZ_MAX_TENSORS", "lots"), ("OPDVIZ_MAX_JSON_DEPTH", "-3"),
                                        ("OPDVIZ_MAX_JSON_MB", "nan"), ("OPDVIZ_MAX_HEADER_MB", "500")])
def test_bad_limit_settings_are_clear_errors(tmp_path, pair, monkeypatch, capsys, env, value):
    monkeypatch.setenv(env, value)
    db = tmp_path / "x.duckdb"
    rc, err = _run(_compute(*pair, db), capsys)
    assert rc == 2 and env in err and "Traceback" not in err
    _no_store(db)


@pytest.mark.parametrize("text", [
    b'{"a": [1, {"b": "[[[{{"}], "c": "\\\\", "d": "\\"[", "e": {}}',
    b'[]', b'"just a string with [ and {"', b'{"k\\\\\\"[": [[[]]]}',
])
def test_depth_scan_matches_a_reference(text):
    def depth(v):
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        return 0
    assert scan_json(text).depth == depth(json.loads(text))


@pytest.mark.parametrize("seed", range(5))
def test_depth_scan_matches_a_reference_on_random_documents(seed):
    import random

    rng = random.Random(seed)
    alphabet = 'ab[]{}",\\\'/ \u00e9'

    def value(level):
        r = rng.random()
        if level > 6 or r < 0.3:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6))) if r < 0.2 else rng.randrange(-9, 9)
        if r < 0.65:
            return [value(level + 1) for _ in range(rng.randrange(4))]
        return {"".join(rng.choice(alphabet) for _ in range(3)) + str(i): value(level + 1) for i in range(rng.randrange(4))}

    def depth(v):
        kids = list(v.values()) if isinstance(v, dict) else v if isinstance(v, list) else None
        return 0 if kids is None else 1 + max(map(depth, kids), default=0)

    doc = {f"t{i}": value(1) for i in range(50)}
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
    scan = scan_json(text)
    assert scan.depth == depth(doc)
    assert scan.members == sum(isinstance(v, dict) for v in doc.values())


# ------------------------------------------------------------------------ 8. options checked up front

@pytest.mark.parametrize("flags, words", [
    (["--include", "model.(layers"], ["--include", "not a valid regular expression"]),
    (["--exclude", "x" * 1001], ["--exclude", "1001 characters", "at most 1000"]),
    (["--abs-eps", "nan"], ["--abs-eps", "finite number > 0", "nan"]),
    (["--abs-eps", "inf"], ["--abs-eps", "inf"]),
    (["--abs-eps=-1e-5"], ["--abs-eps", "-1e-05"]),
    (["--abs-eps", "0"], ["--abs-eps", "0.0"]),
    (["--relrms-tau", "1e-3", "1e-3"], ["--relrms-tau", "twice"]),
    (["--bf16-eta=-inf"], ["--bf16-eta"]),
    (["--coverage-alphas", "1.5"], ["--coverage-alphas", "(0, 1]"]),
    (["--proj-fracs", "nan"], ["--proj-fracs", "(0, 1]"]),
    (["--map-size", "0"], ["--map-size"]),
    (["--seed", "-1"], ["--seed"]),
    (["--name", ""], ["run name", "empty"]),
    (["--name", "   "], ["run name", "empty"]),
    (["--name", "a\nb"], ["run name", "control", "U+000A"]),
    (["--name", "evil\u202egnp.exe"], ["run name", "U+202E"]),
    (["--name", " padded"], ["run name", "whitespace"]),
    (["--name", "n" * 201], ["run name", "at most 200"]),
    (["--name", "ok", "--method", "R\x1b[31mL"], ["method label", "U+001B"]),
    (["--name", "ok", "--method", "\t"], ["method label", "empty"]),
])
def test_bad_compute_options_fail_before_any_work(tmp_path, pair, capsys, flags, words):
    db = tmp_path / "x.duckdb"
    rc, err = _run(_compute(*pair, db, *flags), capsys)
    assert rc == 2, err
    for w in words:
        assert w in err, (w, err)
    assert "Traceback" not in err
    _no_store(db)


def test_bad_options_leave_an_existing_store_unchanged(stored, pair, capsys):
    before = _files(stored)
    runs = Store(stored).runs()[["run_id", "status", "n_done"]]
    for flags in (["--name", "kept", "--abs-eps", "nan"], ["--name", "kept", "--include", "("],
                  ["--name", "x\x00y"], ["--name", "kept", "--method", ""]):
        rc, err = _run(_compute(*pair, stored, *flags), capsys)
        assert rc == 2 and "error" in err
    assert _files(stored) == before
    pd.testing.assert_frame_equal(Store(stored).runs()[["run_id", "status", "n_done"]], runs)


@pytest.mark.parametrize("args, words", [
    (["--name", "t\x07", "--method", "RL"], ["trajectory name", "U+0007"]),
    (["--name", "t", "--method", " "], ["method label", "empty"]),
    (["--name", "t", "--method", "RL", "--hill-frac", "nan"], ["--hill-frac", "nan"]),
    (["--name", "t", "--method", "RL", "--k", "0"], ["--k"]),
    (["--name", "t", "--method", "RL", "--abs-eps", "inf"], ["--abs-eps"]),
])
def test_bad_trajectory_options_fail_before_any_work(tmp_path, pair, capsys, args, words):
    db = tmp_path / "t.duckdb"
    rc, err = _run(["trajectory", "--db", db, pair[0], pair[1], "--steps", "10", "--no-progress", *args], capsys)
    assert rc == 2 and all(w in err for w in words), err
    _no_store(db)


@pytest.mark.parametrize("args, words", [
    (["--run-a", "", "--run-b", "b"], ["--run-a", "empty"]),
    (["--run-a", "a", "--run-b", "b\r", "--method-b", "RL"], ["--run-b", "U+000D"]),
    (["--run-a", "a", "--run-b", "b", "--method-a", "\u200b"], ["--method-a", "U+200B"]),
    (["--run-a", "a", "--run-b", "b", "--include", "[z-a]"], ["--include", "not a valid regular expression"]),
])
def test_bad_overlap_options_fail_before_any_work(tmp_path, pair, capsys, args, words):
    db = tmp_path / "o.duckdb"
    rc, err = _run(["overlap", "--db", db, "--base", pair[0], "--a", pair[1], "--b", pair[1], "--no-progress",
                    *args], capsys)
    assert rc == 2 and all(w in err for w in words), err
    _no_store(db)


@pytest.mark.parametrize("argv", [["fold", "--db", "X", "--wait", "nan"], ["fold", "--db", "X", "--wait", "-1"],
                                  ["worker", "--db", "X", "--idle-exit", "inf"],
                                  ["compute", "B", "P", "--db", "X", "--executor", "ray", "--ray-gpus-per-task", "nan"]])
def test_other_numeric_flags_refuse_nan_and_infinities(tmp_path, capsys, argv):
    argv = [str(tmp_path / "x.duckdb") if a == "X" else a for a in argv]
    with pytest.raises(SystemExit) as e:                # argparse's own usage error
        cli(argv)
    assert e.value.code == 2 and "must be a finite number ≥ 0" in capsys.readouterr().err
    _no_store(tmp_path / "x.duckdb")


@pytest.mark.parametrize("criterion", ["abs_nan", "abs_inf", "abs_0", "relrms_-1e-3"])
def test_bad_mask_criterion_writes_nothing(tmp_path, pair, capsys, criterion):
    out = tmp_path / "m.safetensors"
    rc, err = _run(["masks", "--base", pair[0], "--post", pair[1], "--criterion", criterion, "--out", out], capsys)
    assert rc == 2 and "unknown criterion" in err and criterion in err
    assert not out.exists()


def test_batch_file_is_validated_the_same_way(tmp_path, pair, capsys):
    batch = tmp_path / "b.json"
    batch.write_text(json.dumps({
        "options": {"abs_eps": [1e-5, float("nan")], "include": "(("},
        "bases": [{"path": str(pair[0]),
                   "posts": [{"name": "a\u0000b", "path": str(pair[1])},
                             {"name": "  ", "path": str(pair[1]), "method": "RL"},
                             {"name": "ok", "path": str(pair[1]), "method": "R\nL"}],
                   "trajectories": [{"name": "", "method": "RL",
                                     "checkpoints": [{"step": 1, "path": str(pair[1])}]}]}]}))
    db = tmp_path / "b.duckdb"
    rc, err = _run(["batch", batch, "--db", db, "--no-progress"], capsys)
    assert rc == 2 and "nothing was run" in err, err
    for w in ["options: --abs-eps", "posts[0].name", "U+0000", "posts[1].name", "posts[2].method",
              "trajectories[0].name"]:
        assert w in err, (w, err)
    _no_store(db)


def test_deep_json_batch_file_is_a_clear_error(tmp_path, capsys):
    batch = tmp_path / "b.json"
    batch.write_bytes(_deep())
    rc, err = _run(["batch", batch, "--db", tmp_path / "b.duckdb"], capsys)
    assert rc == 2 and "nested deeper" in err


@pytest.mark.parametrize("name, method, words", [
    ("a\u202eb", "OPD", ["run name", "U+202E"]), ("ok", "R\x00L", ["method label", "U+0000"]),
    ("ok", "OPD", None)])
def test_browser_job_requests_are_checked_before_queueing(tmp_path, pair, name, method, words):
    from opdviz.engine.queue import JobRequest, queue_dir, submit

    db = tmp_path / "q.duckdb"
    request = JobRequest(base=str(pair[0]), posts=((str(pair[1]), name, method),))
    if words is None:
        assert submit(db, request) and queue_dir(db).exists()       # the same request with plain text is queued
        return
    with pytest.raises(OptionsError) as e:
        submit(db, request)
    assert all(w in str(e.value) for w in words)
    _no_store(db)
    with pytest.raises(OptionsError, match="--abs-eps"):
        submit(db, JobRequest(base=str(pair[0]), posts=((str(pair[1]), "ok", "OPD"),),
                              options=json.dumps({"abs_eps": [float("nan")]})))
    _no_store(db)


def test_options_object_checks_types_and_names():
    with pytest.raises(OptionsError, match="--angle-ks"):
        AnalysisOptions(angle_ks=(16.5,))
    with pytest.raises(OptionsError, match="--include"):
        AnalysisOptions(include="a\x00b")
    assert check_label("Qwen2.5 OPD (λ=0.1) – run #3") == "Qwen2.5 OPD (λ=0.1) – run #3"


# ------------------------------------------------------------------------- 9. CSV formula injection

@pytest.mark.parametrize("cell", ["=1+1", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\t=1", "\r=1",
                                  "=HYPERLINK(\"http://x\",\"y\")"])
def test_formula_cells_are_quoted(cell):
    assert neutralise(cell) == "'" + cell


@pytest.mark.parametrize("cell", ["opd", "-0.5", "+1e-5", "-3", "1=1", "a@b", "", None, -0.5, 3])
def test_other_cells_are_unchanged(cell):
    assert neutralise(cell) == cell


def _csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_figure_data_csv_neutralises_text_and_keeps_numbers():
    df = pd.DataFrame({"run": ["=cmd()", "ok"], "tensor": pd.Categorical(["@x", "-y"]), "value": [-0.5, -2.0],
                       "n": [-1, 2], "=col": ["a", "b"]})
    rows = _csv_rows(data_bytes(df, "csv").decode())
    assert rows[0] == ["run", "tensor", "value", "n", "'=col"]
    assert rows[1] == ["'=cmd()", "'@x", "-0.5", "-1", "a"]
    assert rows[2] == ["ok", "'-y", "-2.0", "2", "b"]
    assert to_csv(df) == data_bytes(df, "csv").decode()
    assert df["run"].tolist() == ["=cmd()", "ok"]               # the caller's frame is not modified
    assert csv_safe(df)["value"].dtype == df["value"].dtype


def test_metrics_export_neutralises_run_names_and_methods(tmp_path, pair, capsys):
    db = tmp_path / "c.duckdb"
    assert cli([str(a) for a in _compute(*pair, db, "--name", "=HYPERLINK(\"x\")", "--method", "@RL")]) == 0
    out = tmp_path / "e.csv"
    assert cli(["metrics", "--db", str(db), "-o", str(out)]) == 0
    capsys.readouterr()
    rows = _csv_rows(out.read_text())
    assert rows[0] == ["run", "method", "tensor", "tower", "layer", "block", "module", "metric", "value"]
    assert {r[0] for r in rows[1:]} == {"'=HYPERLINK(\"x\")"} and {r[1] for r in rows[1:]} == {"'@RL"}
    values = [float(r[-1]) for r in rows[1:] if r[-1]]           # numbers stay numbers, negatives included
    assert values and all(not r[-1].startswith("'") for r in rows[1:])
    assert cli(["metrics", "--db", str(db)]) == 0               # the same to standard output
    assert _csv_rows(capsys.readouterr().out)[1][:2] == ["'=HYPERLINK(\"x\")", "'@RL"]
