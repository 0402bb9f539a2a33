"""The store: staged fragments, views, folding, and the cross-process lock hand-off."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import duckdb
import pytest

from opdviz.store import SCHEMAS, RunWriter, Store, now


def _tensor(writer: RunWriter, name: str, value: float, layer: int = 0) -> None:
    writer.write_tensor(
        name,
        [{"tensor": name, "parent": "", "status": "ok", "layer": layer, "numel": 4, "shape": [2, 2], "seq": layer}],
        [{"tensor": name, "metric": "delta_fro", "value": value}],
        [{"tensor": name, "name": "spectrum", "shape": [2], "values": [value, value / 2]}],
        [],
    )


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "r.duckdb")


def test_empty_store_has_every_view(store):
    assert not store.exists()
    for table in SCHEMAS:
        assert store.query(f"SELECT count(*) AS n FROM {table}")["n"][0] == 0


def test_staged_rows_are_visible_then_folded_once(store):
    w = RunWriter(store, "run/a")            # names with separators are fine
    w.write_run({"method": "OPD", "status": "running", "created_at": now()})
    for i in range(3):
        _tensor(w, f"t{i}", float(i), i)
    before = store.query("SELECT tensor, value FROM metrics ORDER BY tensor")
    assert list(before["value"]) == [0.0, 1.0, 2.0]
    assert store.fold()
    assert not store._fragments("metrics")
    after = store.query("SELECT tensor, value FROM metrics ORDER BY tensor")
    assert before.equals(after)
    # a second fold of the same tensors (a crash between commit and unlink) does not duplicate rows
    _tensor(w, "t1", 1.0, 1)
    assert store.query("SELECT count(*) AS n FROM metrics")["n"][0] == 3
    assert store.fold()
    assert store.query("SELECT count(*) AS n FROM metrics")["n"][0] == 3


def test_newest_run_row_wins(store):
    w = RunWriter(store, "a")
    w.write_run({"method": "OPD", "status": "running", "created_at": now()})
    store.fold()
    w.write_run({"method": "OPD", "status": "done", "created_at": now()})
    assert store.runs()["status"].tolist() == ["done"]
    store.fold()
    assert store.runs()["status"].tolist() == ["done"]


def test_torn_tensor_is_invisible(store):
    """Fragments written before the tensors marker (a job killed mid-write) are hidden."""
    w = RunWriter(store, "a")
    _tensor(w, "whole", 1.0)
    name = next(p.name for p in store._fragments("tensors"))
    (store.staging / "tensors" / name).unlink()
    assert store.query("SELECT count(*) AS n FROM metrics")["n"][0] == 0
    assert store.done_tensors("a") == set()
    assert store.fold()                     # the orphan is not folded either
    assert store.query("SELECT count(*) AS n FROM metrics")["n"][0] == 0


def test_fold_gives_up_at_once_while_another_process_holds_the_file(store, tmp_path):
    w = RunWriter(store, "a")
    _tensor(w, "x", 1.0)
    store.fold()
    _tensor(w, "y", 2.0)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys
        con = duckdb.connect({str(store.db_path)!r})
        print("locked", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert store.fold(wait=0) is False          # the job goes on computing
        assert store._fragments("metrics")           # nothing lost
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # readers are back as soon as the holder is gone; the retried fold succeeds
    assert store.fold(wait=5)
    assert sorted(store.query("SELECT tensor FROM metrics")["tensor"]) == ["x", "y"]


def test_unwritable_location_is_a_clear_error(tmp_path):
    """A --db whose folder cannot be created (here: a path below a regular file, which fails even
    for root) raises StoreError telling the user to choose a writable location."""
    from opdviz.errors import StoreError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="writable"):
        RunWriter(Store(blocker / "x.duckdb"), "a")


def test_reader_does_not_hold_the_file(store):
    w = RunWriter(store, "a")
    _tensor(w, "x", 1.0)
    store.fold()
    store.query("SELECT * FROM metrics")
    con = duckdb.connect(str(store.db_path))     # would fail if a reader kept the file open
    con.close()
