"""Folding: moving a job's finished staged fragments into the ``.duckdb`` file, and deleting a run.

A running job never keeps the ``.duckdb`` file open (DuckDB would lock every reader out): now and then,
and at the end of a run, it folds finished fragments into the file in one short transaction (skipped and
retried later if a reader holds the file) and deletes them. Folds of several processes take turns under
a file lock. ``Store.fold`` and ``Store.delete_run`` call these.
"""

from __future__ import annotations

import contextlib
import fcntl
import random
import time
from typing import TYPE_CHECKING

import duckdb

from opdviz.errors import StoreError
from opdviz.store.disk import disk_full, is_disk_full, is_lock_error
from opdviz.store.schema import (ARRAY_KEY, ARRAY_KEY_SQL, CORE_TABLES, INDEXES, KEYED_TABLES, SCHEMAS, SMALL_ARRAY, TENSOR_TABLES, ddl, index_ddl,
                                  physical, slug, sql_list)

if TYPE_CHECKING:
    from opdviz.store.core import Store


class _Vanished(Exception):
    """A staged fragment listed for a fold disappeared before it was read."""


@contextlib.contextmanager
def fold_lock(store: Store, wait: float):
    """Exclusive lock among folding processes (a fold lists fragments, reads them, deletes them: two at
    once would read files the other just removed). Yields False if another fold held it for ``wait`` s."""
    try:
        store.staging.mkdir(parents=True, exist_ok=True)
        fh = open(store.staging / "fold.lock", "a+")
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(exc, store.staging, "folding results into the database") from None
        raise StoreError(f"cannot write in {store.staging}: {exc.strerror or exc}; check the folder is "
                         "writable.") from None
    with fh:
        deadline = time.monotonic() + wait
        delay = 0.02
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

def connect_rw(store: Store, deadline: float) -> duckdb.DuckDBPyConnection | None:
    """A read-write connection to the file, retried with jittered backoff while another process holds
    it; None at the deadline. Refuses a file that is not an opdviz store (nothing is written to it)."""
    if store.db_path.exists():
        store._check_header()
    store.db_path.parent.mkdir(parents=True, exist_ok=True)
    delay = 0.02
    while True:
        try:
            con = duckdb.connect(str(store.db_path))
            break
        except duckdb.Error as exc:
            if is_disk_full(exc):
                raise disk_full(exc, store.db_path, "folding results into the database") from None
            if not is_lock_error(exc):
                raise StoreError(f"cannot open {store.db_path} for writing: {exc}. Check the folder is "
                                 "writable and the disk is not full; results stay in "
                                 f"{store.staging} meanwhile.") from exc
            if time.monotonic() >= deadline:
                return None
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                        "WHERE table_schema = 'main'").fetchall()}
    if tables and not CORE_TABLES <= tables:   # created by someone else between check and connect
        con.close()
        raise StoreError(f"{store.db_path} is a DuckDB database but not an opdviz store; opdviz left it "
                         "untouched. Choose another --db path.")
    return con

def fold(store: Store, wait: float = 0.0) -> bool:
    """Move finished staged fragments into the ``.duckdb`` file; False if it (or another process's
    fold) held it for longer than ``wait`` seconds, in which case the fragments stay staged and readable.

    Idempotent: rows of each folded (run, tensor) are deleted then inserted in one transaction,
    so a crash between commit and fragment deletion only leaves duplicates that the views and
    the next fold resolve. Folds of several processes take turns (``fold_lock``).
    """
    if not store._fragments("tensors") and not store._fragments("runs") and \
            not any(store._fragments(t) for t in KEYED_TABLES):
        return True
    deadline = time.monotonic() + wait
    with fold_lock(store, wait) as held:
        if not held:
            return False
        for attempt in range(3):
            try:
                return _fold_once(store, deadline)
            except _Vanished:           # a fold of an older opdviz without the lock removed files
                if attempt == 2:
                    raise StoreError(f"staged files of {store.db_path} kept disappearing while folding; is "
                                     "another program deleting them?") from None
    return False

def _ensure_array_key(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """Give the physical array table ``name`` its key column, filled for the rows already there (a file
    written before it existed; a new table is empty), and the index on it (``schema.INDEXES``)."""
    has = con.execute("SELECT count(*) FROM duckdb_columns() WHERE database_name = current_database() AND "
                      "schema_name = 'main' AND table_name = ? AND column_name = ?", [name, ARRAY_KEY]).fetchone()[0]
    if not has:
        con.execute("BEGIN TRANSACTION")
        con.execute(f"ALTER TABLE {name} ADD COLUMN {ARRAY_KEY} VARCHAR")
        con.execute(f"UPDATE {name} SET {ARRAY_KEY} = {ARRAY_KEY_SQL}")
        con.execute("COMMIT")           # DuckDB makes no index over updates in the same transaction
        con.execute(f"DROP INDEX IF EXISTS {name}_tensor")    # the index on tensor alone it replaces
    con.execute(index_ddl(name))


def _fold_once(store: Store, deadline: float) -> bool:
    marker_files = store._fragments("tensors")
    complete = {p.name for p in marker_files}
    batch = {t: [p for p in store._fragments(t) if p.name in complete] for t in TENSOR_TABLES}
    run_files = store._fragments("runs")
    keyed = {t: store._fragments(t) for t in KEYED_TABLES}
    if not marker_files and not run_files and not any(keyed.values()):
        return True
    con = connect_rw(store, deadline)
    if con is None:
        return False
    try:
        for table in SCHEMAS:
            for name in physical(table):
                con.execute(ddl(table, name))
                if name in INDEXES:
                    _ensure_array_key(con, name)
        con.execute("BEGIN TRANSACTION")
        if marker_files:
            keys = f"(SELECT DISTINCT run_id, tensor FROM read_parquet({sql_list(marker_files)}))"
            for table in TENSOR_TABLES:
                for name in physical(table):
                    con.execute(f"DELETE FROM {name} WHERE (run_id, tensor) IN {keys}")
                if not batch[table]:
                    continue
                key = f", {ARRAY_KEY_SQL} AS {ARRAY_KEY}" if table == "arrays" else ""
                rows = f"SELECT *{key} FROM read_parquet({sql_list(batch[table])})"
                if table == "arrays":
                    con.execute(f"INSERT INTO small_arrays BY NAME {rows} WHERE len(\"values\") <= {SMALL_ARRAY}")
                    rows += f" WHERE len(\"values\") > {SMALL_ARRAY} OR \"values\" IS NULL"
                con.execute(f"INSERT INTO {table} BY NAME {rows}")
        for table, files in keyed.items():
            if files:
                key = ", ".join(KEYED_TABLES[table])
                con.execute(f"DELETE FROM {table} WHERE ({key}) IN (SELECT DISTINCT {key} FROM "
                            f"read_parquet({sql_list(files)}))")
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet({sql_list(files)})")
        if run_files:
            latest = (f"SELECT * FROM read_parquet({sql_list(run_files)}) QUALIFY row_number() OVER "
                      "(PARTITION BY run_id ORDER BY updated_at DESC NULLS LAST) = 1")
            con.execute(f"CREATE TEMP TABLE new_runs AS {latest}")
            con.execute("""DELETE FROM runs WHERE run_id IN (SELECT run_id FROM new_runs)
                           AND updated_at <= (SELECT max(updated_at) FROM new_runs n WHERE n.run_id = runs.run_id)""")
            con.execute("""INSERT INTO runs BY NAME SELECT * FROM new_runs n WHERE NOT EXISTS
                           (SELECT 1 FROM runs r WHERE r.run_id = n.run_id)""")
        con.execute("COMMIT")
    except duckdb.Error as exc:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        if "No files found" in str(exc) or "No such file" in str(exc):
            raise _Vanished() from exc
        if is_disk_full(exc):
            raise disk_full(exc, store.db_path, "folding results into the database") from None
        raise StoreError(f"folding results into {store.db_path} failed: {exc}. Nothing was lost: the "
                         f"fragments are still in {store.staging}.") from exc
    finally:
        con.close()
    for files in list(batch.values()) + [run_files] + list(keyed.values()):
        for p in files:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return True

def delete_run(store: Store, run_id: str) -> None:
    """Remove every stored and staged row of ``run_id`` (used by ``--overwrite``)."""
    prefix = slug(run_id)
    with fold_lock(store, 30.0) as held:
        if not held:
            raise StoreError(f"cannot delete run {run_id!r}: another process kept folding into "
                             f"{store.db_path} for 30 s; retry.")
        for table in SCHEMAS:
            for p in store._fragments(table):
                if p.name.startswith(prefix + "__") or p.name == prefix + ".parquet":
                    p.unlink(missing_ok=True)
        if not store.db_path.exists():
            return
        con = connect_rw(store, time.monotonic() + 10.0)
        if con is None:
            raise StoreError(f"cannot delete run {run_id!r}: {store.db_path} is in use by another process. "
                             "Close the dashboard's job or retry.")
        with contextlib.closing(con):
            for table in SCHEMAS:
                for name in physical(table):
                    con.execute(ddl(table, name))
                    if table not in KEYED_TABLES:
                        con.execute(f"DELETE FROM {name} WHERE run_id = ?", [run_id])
