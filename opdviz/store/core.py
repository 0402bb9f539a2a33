"""``Store``: one result store, a DuckDB file plus its staging folder, read through union views.

How the two parts fit together is told in ``opdviz.store``'s docstring. Reading never blocks a writer for
longer than one query: each query borrows a pooled in-memory connection (``opdviz.store.pool``), attaches
the file read-only for its length, and retries with jittered backoff while a fold holds the file.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pandas as pd

from opdviz.errors import StoreError
from opdviz.store import fold as folding
from opdviz.store.disk import is_lock_error, not_duckdb
from opdviz.store.pool import _CONNECTIONS
from opdviz.store.schema import (CORE_TABLES, INDEX_SCAN_ROWS, INDEXES, KEYED_TABLES, SCHEMAS, SQL_TYPES, TENSOR_TABLES,
                                 physical, sql_list, sql_str)

if TYPE_CHECKING:
    from opdviz.store.memo import QueryMemo


class Store:
    """A result store at ``db_path`` (``.duckdb``) with its staging folder ``<db_path>.staging``.

    Reading never blocks a writer for longer than one query; writing goes through ``RunWriter``.
    """

    def __init__(self, db_path: str | Path, memo: "QueryMemo | None" = None):
        self.db_path = Path(db_path)
        self.staging = Path(str(self.db_path) + ".staging")
        self.memo = memo

    def version(self) -> tuple:
        """Modification times that change whenever results are written or folded (a cache key)."""
        out = []
        for p in (self.db_path, Path(str(self.db_path) + ".wal"), self.staging / "tensors", self.staging / "runs",
                  *(self.staging / t for t in KEYED_TABLES)):
            try:
                out.append(p.stat().st_mtime_ns)
            except OSError:
                out.append(0)
        return tuple(out)

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return self.db_path.exists() or any(self._fragments("tensors")) or any(self._fragments("runs"))

    def check_readable(self) -> None:
        """Raise StoreError unless this is an opdviz store to read: the ``.duckdb`` file exists (or a job has
        staged results for it), is a DuckDB file, and holds opdviz's tables. Reads only; creates nothing."""
        if self.db_path.is_dir():
            raise StoreError(f"{self.db_path} is a folder; give the path of the .duckdb file opdviz wrote "
                             "(for example data/opdviz.duckdb).")
        if not self.exists():
            raise StoreError(f"no opdviz store at {self.db_path}: compute one first with opdviz.analyze(BASE, POST, "
                             f"db={str(self.db_path)!r}) or `opdviz compute BASE POST --db {self.db_path}` "
                             "(or `opdviz demo --no-serve` for the example).")
        if not self.db_path.exists():
            return                  # a first job is running: its staged results are readable
        if not_duckdb(self.db_path) or self.db_path.stat().st_size < 12:
            raise StoreError(f"{self.db_path} is not a DuckDB file; point at a .duckdb file that opdviz wrote.")
        tables = set(self.query("SELECT table_name FROM information_schema.tables WHERE table_catalog = 'db'")
                     ["table_name"])
        missing = sorted(set(TENSOR_TABLES + ("runs",)) - tables)
        if missing:
            raise StoreError(f"{self.db_path} is a DuckDB file but not an opdviz store (no table "
                             f"{', '.join(missing)}); point at a .duckdb file that opdviz wrote.")

    def _fragments(self, table: str) -> list[Path]:
        folder = self.staging / table
        try:
            return sorted(p for p in folder.iterdir() if p.name.endswith(".parquet"))
        except FileNotFoundError:
            return []

    def _views(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create the union views on an in-memory connection (db attached as ``db`` if present)."""
        attached = False
        tables: set[str] = set()
        con.execute(f"SET index_scan_max_count = {INDEX_SCAN_ROWS}")
        if self.db_path.exists():
            con.execute(f"ATTACH '{sql_str(self.db_path)}' AS db (READ_ONLY)")
            tables = {r[0] for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_catalog = 'db'").fetchall()}
            # a file folded before KEYED_TABLES existed lacks only those: its core tables still count
            attached = set(SCHEMAS) - set(KEYED_TABLES) <= tables
        for table in SCHEMAS:
            files = self._fragments(table)
            cols = ", ".join(f'"{f.name}"' for f in SCHEMAS[table])
            typed = ", ".join(f'CAST(NULL AS {SQL_TYPES[f.type]}) AS "{f.name}"' for f in SCHEMAS[table])
            staged = (f"SELECT {cols} FROM read_parquet({sql_list(files)})" if files
                      else f"SELECT {typed} WHERE false")
            con.execute(f"CREATE TEMP VIEW staged_{table} AS {staged}")
            parts = [f"SELECT {cols} FROM db.main.{name}" for name in physical(table)
                     if attached and name in tables]
            stored = " UNION ALL ".join(parts) or f"SELECT {typed} WHERE false"
            con.execute(f"CREATE TEMP VIEW stored_{table} AS {stored}")
        staged = {table: bool(self._fragments(table)) for table in SCHEMAS}
        if not any(staged.values()):
            # nothing staged (the usual case between jobs): plain views, no anti-joins for DuckDB to plan
            for table in SCHEMAS:
                con.execute(f"CREATE TEMP VIEW {table} AS SELECT * FROM stored_{table}")
            return
        con.execute("""CREATE TEMP VIEW runs AS SELECT * FROM (
            SELECT * FROM staged_runs UNION ALL BY NAME SELECT * FROM stored_runs)
            QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY updated_at DESC NULLS LAST) = 1""")
        # a staged tensor is visible once its tensors row exists; stored rows are replaced by staged ones
        con.execute("""CREATE TEMP VIEW tensors AS
            SELECT * FROM staged_tensors UNION ALL BY NAME
            SELECT * FROM stored_tensors s WHERE NOT EXISTS (
                SELECT 1 FROM staged_tensors t WHERE t.run_id = s.run_id AND t.tensor = s.tensor)""")
        for table in ("metrics", "arrays", "failures"):
            con.execute(f"""CREATE TEMP VIEW {table} AS
                SELECT * FROM staged_{table} x WHERE EXISTS (
                    SELECT 1 FROM staged_tensors t WHERE t.run_id = x.run_id AND t.tensor = x.tensor)
                UNION ALL BY NAME
                SELECT * FROM stored_{table} s WHERE NOT EXISTS (
                    SELECT 1 FROM staged_tensors t WHERE t.run_id = s.run_id AND t.tensor = s.tensor)""")
        for table, key in KEYED_TABLES.items():    # staged rows replace stored rows of the same key
            same = " AND ".join(f"x.{k} = s.{k}" for k in key)
            con.execute(f"""CREATE TEMP VIEW {table} AS SELECT * FROM staged_{table} UNION ALL BY NAME
                SELECT * FROM stored_{table} s WHERE NOT EXISTS (SELECT 1 FROM staged_{table} x WHERE {same})""")

    def query(self, sql: str, params: list | tuple | None = None, *, timeout: float = 10.0) -> pd.DataFrame:
        """Run ``sql`` against the views and return a DataFrame (through ``self.memo`` when set).

        The file is attached read-only for the length of this one query (a kept attachment would lock
        the job out); retries with jittered backoff while a fold holds the file or a fragment disappears.
        """
        if self.memo is None:
            return self._query(sql, params, timeout)
        key = (str(self.db_path), self.version(), sql, tuple(params or ()))
        return self.memo.get(key, lambda: self._query(sql, params, timeout))

    def _query(self, sql: str, params, timeout: float) -> pd.DataFrame:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                return self._run(sql, params)
            except (duckdb.IOException, duckdb.InvalidInputException, duckdb.CatalogException) as exc:
                transient = is_lock_error(exc) or "No files found" in str(exc) or "No such file" in str(exc)
                if not transient and not isinstance(exc, duckdb.IOException):
                    raise StoreError(f"query failed on {self.db_path}: {exc}") from exc
                if not is_lock_error(exc) and not_duckdb(self.db_path):
                    raise StoreError(f"{self.db_path} is not an opdviz DuckDB store ({exc}). Point --db or the "
                                     "sidebar's Database field at a .duckdb file that opdviz wrote.") from exc
                if time.monotonic() > deadline:
                    raise StoreError(f"{self.db_path} stayed busy for {timeout:.0f}s ({exc}); "
                                     "is another process folding a large run? Try again.") from exc
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)

    def _run(self, sql: str, params) -> pd.DataFrame:
        """One query on a pooled in-memory connection: its views are rebuilt only when the staged
        fragments or the file changed; the file is attached for this query only."""
        signature = (self._file_stamp(), tuple(tuple(self._fragments(t)) for t in SCHEMAS))
        with _CONNECTIONS.borrow(self.db_path, signature, self._views) as (con, attached):
            try:
                if not attached and self.db_path.exists():
                    con.execute(f"ATTACH '{sql_str(self.db_path)}' AS db (READ_ONLY)")
                return con.execute(sql, params or []).df()
            finally:
                with contextlib.suppress(duckdb.Error):
                    con.execute("DETACH DATABASE IF EXISTS db")

    def _file_stamp(self) -> tuple:
        try:
            st = self.db_path.stat()
            return (st.st_mtime_ns, st.st_size)
        except OSError:
            return (0, 0)

    def staged_tensors(self) -> bool:
        """Whether a job has staged finished tensors that are not folded into the file yet."""
        return bool(self._fragments("tensors"))

    def has_indexes(self) -> bool:
        """Whether the file holds the array indexes (``schema.INDEXES``; a store folded before they
        existed gets them at its next fold)."""
        if not self.db_path.exists():
            return False
        names = self.query("SELECT index_name FROM duckdb_indexes() WHERE database_name = 'db'")["index_name"]
        return {f"{t}_{c}" for t, c in INDEXES.items()} <= set(names)

    def runs(self) -> pd.DataFrame:
        return self.query("SELECT * FROM runs ORDER BY created_at")

    def done_tensors(self, run_id: str) -> set[str]:
        """Names (parents and parts) of tensors of ``run_id`` whose results are complete."""
        df = self.query("SELECT tensor FROM tensors WHERE run_id = ?", [run_id])
        return set(df["tensor"])

    def run_row(self, run_id: str) -> dict | None:
        df = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
        return None if df.empty else df.iloc[0].to_dict()

    def run_rows(self) -> dict[str, dict]:
        """Every run's row (as ``run_row`` gives it), keyed by run id, from one query: a page about a sweep
        of many runs reads them all at once instead of one query per run."""
        df = self.query("SELECT * FROM runs ORDER BY created_at, run_id")
        return {row["run_id"]: row for row in df.to_dict("records")}

    def stored_counts(self) -> dict[str, int]:
        """Run id → number of its top-level tensors whose results are stored (file and staged fragments):
        what a resume would not recompute."""
        df = self.query("SELECT run_id, count(*) AS n FROM tensors WHERE parent = '' GROUP BY run_id")
        return {r: int(n) for r, n in zip(df["run_id"], df["n"])}

    def check(self) -> None:
        """Refuse, before any work and without writing anything, a location that cannot hold an opdviz store:
        a folder, a 0-byte or non-DuckDB file, a DuckDB database of something else. A missing file is fine
        (it is created by the first fold). Raises StoreError."""
        p = self.db_path
        if p.is_dir():
            raise StoreError(f"--db {p} is a folder, not a store file; give a .duckdb file path such as "
                             f"{p / 'opdviz.duckdb'} (created if missing).")
        if p.exists() and not p.is_file():
            raise StoreError(f"--db {p} is not a regular file; give a .duckdb file path (created if missing).")
        if self.staging.exists() and not self.staging.is_dir():
            raise StoreError(f"{self.staging} (the store's staging folder) is a file; move it away or choose "
                             "another --db.")
        if not p.exists():
            return
        self._check_header()
        tables = set(self._query("SELECT table_name FROM information_schema.tables WHERE table_catalog = 'db'",
                                 None, 10.0)["table_name"])
        if not CORE_TABLES <= tables:
            missing = ", ".join(sorted(CORE_TABLES - tables))
            raise StoreError(f"{p} is a DuckDB database but not an opdviz store (no {missing} table"
                             f"{'s' if len(CORE_TABLES - tables) > 1 else ''}); opdviz writes into no other "
                             "database, and left it untouched. Choose another --db path (a missing file is created).")

    def _check_header(self) -> None:
        """Refuse an existing ``db_path`` that is empty or not a DuckDB file (reads 16 bytes, no lock)."""
        p = self.db_path
        if p.is_dir():
            raise StoreError(f"--db {p} is a folder, not a store file; give a .duckdb file path such as "
                             f"{p / 'opdviz.duckdb'} (created if missing).")
        try:
            with open(p, "rb") as f:
                head = f.read(16)
        except OSError as exc:
            raise StoreError(f"cannot read {p}: {exc.strerror or exc}; check its permissions or choose another "
                             "--db.") from None
        if not head:
            raise StoreError(f"{p} is an empty (0-byte) file, not an opdviz store; delete it or choose another --db "
                             "path (a missing file is created).")
        if len(head) < 12 or head[8:12] != b"DUCK":
            raise StoreError(f"{p} is not a DuckDB file, so not an opdviz store; it was left untouched. Choose "
                             "another --db path (a missing file is created).")

    # ------------------------------------------------------------------ folding (opdviz.store.fold)
    def fold(self, wait: float = 0.0) -> bool:
        """Move finished staged fragments into the ``.duckdb`` file; False if it (or another process's
        fold) held it for longer than ``wait`` seconds, in which case the fragments stay staged and readable
        (``opdviz.store.fold.fold``)."""
        return folding.fold(self, wait)

    def delete_run(self, run_id: str) -> None:
        """Remove every stored and staged row of ``run_id`` (used by ``--overwrite``)."""
        folding.delete_run(self, run_id)
