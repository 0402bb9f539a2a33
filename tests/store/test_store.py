"""The store: staged fragments, views, folding, and the cross-process lock hand-off."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import duckdb
import pytest

from opdviz.store import SCHEMAS, QueryMemo, RunWriter, Store, now
from opdviz.store.schema import SMALL_ARRAY, ddl


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


def test_arrays_are_split_by_length_and_read_as_one(store):
    w = RunWriter(store, "a")
    long = [float(i) for i in range(SMALL_ARRAY + 1)]
    w.write_tensor("x", [{"tensor": "x", "parent": "", "status": "ok", "numel": 4, "shape": [2, 2], "seq": 0}], [],
                   [{"tensor": "x", "name": "short", "shape": [3], "values": [1.0, 2.0, 3.0]},
                    {"tensor": "x", "name": "edge", "shape": [SMALL_ARRAY], "values": long[:SMALL_ARRAY]},
                    {"tensor": "x", "name": "long", "shape": [SMALL_ARRAY + 1], "values": long}], [])
    staged = store.query("SELECT name, len(\"values\") AS n FROM arrays ORDER BY name")
    assert store.fold()
    stored = store.query("SELECT name, len(\"values\") AS n FROM arrays ORDER BY name")
    assert staged.equals(stored) and list(stored["name"]) == ["edge", "long", "short"]
    with duckdb.connect(str(store.db_path), read_only=True) as con:
        assert [r[0] for r in con.execute("SELECT name FROM small_arrays ORDER BY name").fetchall()] == ["edge", "short"]
        assert [r[0] for r in con.execute("SELECT name FROM arrays").fetchall()] == ["long"]
    # folding the same tensor again replaces its rows in both tables
    _tensor(w, "x", 5.0)
    assert store.fold()
    assert list(store.query("SELECT name FROM arrays")["name"]) == ["spectrum"]


def test_store_folded_before_the_split_is_read(store):
    """A file whose arrays all sit in one table (no small_arrays) reads as before."""
    store.db_path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(store.db_path)) as con:
        for table in SCHEMAS:
            con.execute(ddl(table))
        con.execute("INSERT INTO tensors (run_id, tensor, status) VALUES ('old', 'x', 'ok')")
        con.execute("INSERT INTO arrays VALUES ('old', 'x', 'short', [2], [1.0, 2.0])")
    assert store.query("SELECT \"values\" FROM arrays")["values"].map(list).tolist() == [[1.0, 2.0]]


def _write_two_runs(store, runs=("b", "a"), tensors=("y", "x")):
    long = [float(i) for i in range(SMALL_ARRAY + 3)]
    for run in runs:
        w = RunWriter(store, run)
        w.write_run({"method": run.upper(), "status": "done", "created_at": now()})
        for seq, name in enumerate(tensors):
            w.write_tensor(name, [{"tensor": name, "parent": "", "status": "ok", "layer": seq, "numel": 4,
                                   "shape": [2, 2], "seq": seq}], [],
                           [{"tensor": name, "name": "long", "shape": [len(long)], "values": long + [seq]},
                            {"tensor": name, "name": "short", "shape": [2], "values": [seq, 1.0]}], [])


def _same_arrays(a, b):
    assert a.drop(columns=["shape", "values"]).astype(str).equals(b.drop(columns=["shape", "values"]).astype(str))
    assert [list(v) for v in a["values"]] == [list(v) for v in b["values"]]


def _index_names(store):
    with duckdb.connect(str(store.db_path), read_only=True) as con:
        return sorted(r[0] for r in con.execute("SELECT index_name FROM duckdb_indexes()").fetchall())


def test_array_indexes_are_made_by_a_fold_and_used_by_drill_downs(store, monkeypatch):
    """A fold indexes both array tables by their (run, tensor) key (an old file gets the key column and
    the index at its next fold), and a drill-down's read gives the same rows through the key as through
    the join it replaces — also while a job has staged tensors, which only the join sees."""
    from opdviz.store import Selection
    from opdviz.store import queries as Q

    store.db_path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(store.db_path)) as con:      # a store folded before the indexes existed
        for table in SCHEMAS:
            con.execute(ddl(table))
    assert not store.has_indexes()
    _write_two_runs(store)
    assert store.fold() and store.has_indexes()
    assert _index_names(store) == ["arrays_run_tensor", "small_arrays_run_tensor"]
    calls, by_key = [], Q._arrays_by_key

    def counted(*args):
        calls.append(by_key(*args))
        return calls[-1]

    monkeypatch.setattr(Q, "_arrays_by_key", counted)
    cases = ((Selection(), ("x",)), (Selection(runs=("a",)), ("x", "y")), (Selection(), ("z",)),
             (Selection(layer_min=1), ("x", "y")))
    for sel, tensors in cases:
        calls.clear()
        via_key = Q.tensor_arrays(store, sel, tensors)
        assert all(c is not None for c in calls)        # read through the key, where there was anything to read
        monkeypatch.setattr(Q, "_arrays_by_key", lambda *a: None)
        via_join = Q.tensor_arrays(store, sel, tensors)
        monkeypatch.setattr(Q, "_arrays_by_key", counted)
        _same_arrays(via_key, via_join)
    got = Q.tensor_arrays(store, Selection(runs=("a",)), ("x", "y"))
    assert list(zip(got["run_id"], got["tensor"], got["name"])) == [
        ("a", "y", "long"), ("a", "y", "short"), ("a", "x", "long"), ("a", "x", "short")]
    assert list(got["values"].iloc[0])[-1] == 0.0 and list(got["values"].iloc[2])[-1] == 1.0
    # a staged tensor (a job running) is read through the views, replacing its stored rows
    w = RunWriter(store, "a")
    w.write_tensor("x", [{"tensor": "x", "parent": "", "status": "ok", "layer": 1, "numel": 4, "shape": [2, 2],
                          "seq": 1}], [], [{"tensor": "x", "name": "short", "shape": [2], "values": [7.0, 7.0]}], [])
    calls.clear()
    staged = Q.tensor_arrays(store, Selection(runs=("a",)), ("x",))
    assert calls == [None] and list(staged["name"]) == ["short"] and list(staged["values"].iloc[0]) == [7.0, 7.0]
    assert store.fold()
    _same_arrays(Q.tensor_arrays(store, Selection(runs=("a",)), ("x",)), staged)


def test_a_store_indexed_by_tensor_gets_the_key_at_its_next_fold(store):
    """A file folded by the version that indexed arrays by tensor alone: its next fold adds the key column,
    fills it for the rows already there, swaps the indexes, and its drill-downs read the same rows."""
    from opdviz.store import Selection
    from opdviz.store import queries as Q

    store.db_path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(store.db_path)) as con:      # that version's layout
        for table in SCHEMAS:
            con.execute(ddl(table))
        con.execute(ddl("arrays", "small_arrays"))
        for name in ("arrays", "small_arrays"):
            con.execute(f"CREATE INDEX {name}_tensor ON {name} (tensor)")
        con.execute("INSERT INTO tensors (run_id, tensor, status, seq) VALUES ('old', 'x', 'ok', 0)")
        con.execute("INSERT INTO runs (run_id, method) VALUES ('old', 'OLD')")
        con.execute("INSERT INTO arrays VALUES ('old', 'x', 'long', [70], range(70)::DOUBLE[])")
        con.execute("INSERT INTO small_arrays VALUES ('old', 'x', 'short', [2], [1.0, 2.0])")
    assert not store.has_indexes()
    before = Q.tensor_arrays(store, Selection(), ("x",))
    assert list(before["name"]) == ["long", "short"]
    _write_two_runs(store, runs=("new",), tensors=("x",))
    assert store.fold() and store.has_indexes()
    assert _index_names(store) == ["arrays_run_tensor", "small_arrays_run_tensor"]
    with duckdb.connect(str(store.db_path), read_only=True) as con:
        keys = con.execute("SELECT DISTINCT run_tensor FROM arrays UNION SELECT DISTINCT run_tensor FROM "
                           "small_arrays ORDER BY 1").fetchall()
    assert keys == [("new\x1fx",), ("old\x1fx",)]
    after = Q.tensor_arrays(store, Selection(runs=("old",)), ("x",))
    _same_arrays(after, before)
    assert list(Q.tensor_arrays(store, Selection(), ("x",))["run_id"]) == ["new", "new", "old", "old"]


def test_reused_connection_sees_new_results_and_never_holds_the_file(store):
    w = RunWriter(store, "a")
    _tensor(w, "x", 1.0)
    assert store.fold()
    for i, name in enumerate(("y", "z")):
        assert len(store.query("SELECT * FROM metrics")) == i + 1
        _tensor(w, name, 2.0)                      # staged: seen by the next query
        assert len(store.query("SELECT * FROM metrics")) == i + 2
        # another process can fold between our queries (the file is attached only during one)
        code = f"from opdviz.store import Store; assert Store({str(store.db_path)!r}).fold(wait=0)"
        subprocess.run([sys.executable, "-c", code], check=True)
        assert not store._fragments("metrics")
    assert sorted(store.query("SELECT tensor FROM metrics")["tensor"]) == ["x", "y", "z"]


def test_not_a_duckdb_file_is_a_clear_error(tmp_path):
    from opdviz.errors import StoreError

    bad = tmp_path / "notes.duckdb"
    bad.write_bytes(b"these are my notes, not a database" * 100)
    with pytest.raises(StoreError, match="not an opdviz DuckDB store"):
        Store(bad).query("SELECT * FROM runs", timeout=30)


def test_memo_runs_a_query_once_and_sees_new_versions(store):
    import threading

    w = RunWriter(store, "a")
    _tensor(w, "x", 1.0)
    memo = QueryMemo()
    calls = []
    real = Store._query

    def counting(self, sql, params, timeout):
        calls.append(sql)
        return real(self, sql, params, timeout)

    memoised = Store(store.db_path, memo=memo)
    Store._query = counting
    try:
        out = []
        threads = [threading.Thread(target=lambda: out.append(memoised.query("SELECT * FROM metrics")))
                   for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(calls) == 1 and all(len(df) == 1 for df in out)
        out[0]["extra"] = 1                          # a caller's change does not reach the others
        assert "extra" not in memoised.query("SELECT * FROM metrics")
        assert len(calls) == 1
        _tensor(w, "y", 2.0)                          # a new fragment changes the version
        assert len(memoised.query("SELECT * FROM metrics")) == 2 and len(calls) == 2
    finally:
        Store._query = real
    small = QueryMemo(max_bytes=1)                    # a result larger than the memo is not kept
    Store(store.db_path, memo=small).query("SELECT * FROM metrics")
    assert small.bytes == 0


def test_idle_connections_are_bounded_and_closed_before_a_fork(store):
    """Readers on many threads leave at most a few pooled DuckDB instances, and none survive into a forked
    child (Ray's process launcher runs Python code between fork and exec, which crashed while dozens of
    DuckDB instances were alive)."""
    import os
    import threading

    from opdviz.store.pool import _CONNECTIONS

    w = RunWriter(store, "a")
    _tensor(w, "x", 1.0)
    store.fold()
    others = [Store(store.db_path.with_name(f"o{i}.duckdb")) for i in range(3)]
    threads = [threading.Thread(target=lambda: [s.query("SELECT count(*) FROM metrics") for s in [store, *others]])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < len(_CONNECTIONS._idle) <= _CONNECTIONS.max_idle
    pid = os.fork()
    if pid == 0:
        os._exit(len(_CONNECTIONS._idle))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(store.query("SELECT * FROM metrics")) == 1          # readers carry on after the fork
