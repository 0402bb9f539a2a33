"""The result store: a DuckDB file plus a staging folder of immutable Parquet fragments.

Why two parts: DuckDB lets one process hold a file read-write and then locks every other process
out, readers included, failing at once. So a running job never keeps the ``.duckdb`` file open:
it writes each finished tensor as Parquet fragments (temp name, then ``os.replace``) under
``<db>.staging/``, the ``tensors`` fragment last (it is the commit marker: the views hide
fragments of a tensor whose ``tensors`` row is not there yet, so a reader never sees a torn
tensor). Now and then, and at the end of a run, the job *folds* finished fragments into the
``.duckdb`` file in one short transaction (skipped and retried later if a reader holds the file)
and deletes them. Readers open an in-memory DuckDB, attach the file read-only for the length of
one query (retrying with jittered backoff while a fold holds it), and see the union of both parts
through the views ``runs``, ``tensors``, ``metrics``, ``arrays``, ``failures``.

Schema (documented in the README):
  runs(run_id, method, kind, base_path, post_path, base_fingerprint, post_fingerprint, base_bytes,
       post_bytes, trajectory, step, options, versions, device, dtype, seed, status, error,
       created_at, updated_at, finished_at, wall_s, n_tensors, n_done, n_skipped, n_failed,
       bytes_total, bytes_done, extra)
  tensors(run_id, tensor, parent, part, tower, layer, block, module, expert, param, shape, rows,
          cols, numel, dtype, status, reason, spectrum_exact, seconds, seq)
  metrics(run_id, tensor, metric, value)
  arrays(run_id, tensor, name, shape, values)
  failures(run_id, tensor, stage, error, message)
  overlap(run_a, run_b, tensor, tower, layer, block, module, criterion, numel, n_a, n_b, n_ab)
  trajectory(trajectory, step, tensor, metric, value)

Arrays are stored in two physical tables by length: ``small_arrays`` (at most ``SMALL_ARRAY`` values:
sweeps, deciles, low-k angles, rank grids) and ``arrays`` (the rest). DuckDB reads list columns a
vector of 2048 rows at a time, so a query over one small array of every tensor would otherwise decode
the spectra and maps stored beside it; the ``arrays`` view unions both.

``overlap`` and ``trajectory`` (opdviz.engine.overlap, opdviz.engine.trajectory) are keyed otherwise than
(run_id, tensor): see ``KEYED_TABLES``. Each of their fragments is one file written whole (one
``os.replace``, so no marker is needed) and folding replaces the stored rows of its keys.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from opdviz.errors import DiskFullError, StoreError

_i64, _f64, _str = pa.int64(), pa.float64(), pa.string()
_ts = pa.timestamp("us", tz="UTC")

SCHEMAS: dict[str, pa.Schema] = {
    "runs": pa.schema([
        ("run_id", _str), ("method", _str), ("kind", _str), ("base_path", _str), ("post_path", _str),
        ("base_fingerprint", _str), ("post_fingerprint", _str), ("base_bytes", _i64), ("post_bytes", _i64),
        ("trajectory", _str), ("step", _i64), ("options", _str), ("versions", _str), ("device", _str),
        ("dtype", _str), ("seed", _i64), ("status", _str), ("error", _str), ("created_at", _ts),
        ("updated_at", _ts), ("finished_at", _ts), ("wall_s", _f64), ("n_tensors", _i64), ("n_done", _i64),
        ("n_skipped", _i64), ("n_failed", _i64), ("bytes_total", _i64), ("bytes_done", _i64), ("extra", _str),
    ]),
    "tensors": pa.schema([
        ("run_id", _str), ("tensor", _str), ("parent", _str), ("part", _str), ("tower", _str),
        ("layer", _i64), ("block", _str), ("module", _str), ("expert", _i64), ("param", _str),
        ("shape", pa.list_(_i64)), ("rows", _i64), ("cols", _i64), ("numel", _i64), ("dtype", _str),
        ("status", _str), ("reason", _str), ("spectrum_exact", pa.bool_()), ("seconds", _f64), ("seq", _i64),
    ]),
    "metrics": pa.schema([("run_id", _str), ("tensor", _str), ("metric", _str), ("value", _f64)]),
    "arrays": pa.schema([("run_id", _str), ("tensor", _str), ("name", _str), ("shape", pa.list_(_i64)),
                         ("values", pa.list_(_f64))]),
    "failures": pa.schema([("run_id", _str), ("tensor", _str), ("stage", _str), ("error", _str),
                           ("message", _str)]),
    "overlap": pa.schema([("run_a", _str), ("run_b", _str), ("tensor", _str), ("tower", _str), ("layer", _i64),
                          ("block", _str), ("module", _str), ("criterion", _str), ("numel", _i64),
                          ("n_a", _i64), ("n_b", _i64), ("n_ab", _i64)]),
    "trajectory": pa.schema([("trajectory", _str), ("step", _i64), ("tensor", _str), ("metric", _str),
                             ("value", _f64)]),
}
# tables whose rows are not keyed by (run_id, tensor): table → key columns (a fragment holds whole keys)
KEYED_TABLES = {"overlap": ("run_a", "run_b", "tensor"), "trajectory": ("trajectory", "tensor")}
TENSOR_TABLES = ("tensors", "metrics", "arrays", "failures")
# arrays of at most this many values live in the physical table small_arrays (see the module docstring)
SMALL_ARRAY = 64
# fragments of a tensor are written in this order; "tensors" last marks the tensor complete
WRITE_ORDER = ("arrays", "metrics", "failures", "tensors")
# the tables every opdviz store file has (older stores may lack small_arrays and the keyed tables)
CORE_TABLES = frozenset(("runs", "tensors", "metrics", "arrays", "failures"))

_SQL_TYPES = {pa.int64(): "BIGINT", pa.float64(): "DOUBLE", pa.string(): "VARCHAR", pa.bool_(): "BOOLEAN",
              _ts: "TIMESTAMPTZ", pa.list_(_i64): "BIGINT[]", pa.list_(_f64): "DOUBLE[]"}


def _ddl(table: str, name: str | None = None) -> str:
    """CREATE TABLE for ``table``'s schema, named ``name`` (default: ``table``)."""
    cols = ", ".join(f'"{f.name}" {_SQL_TYPES[f.type]}' for f in SCHEMAS[table])
    return f"CREATE TABLE IF NOT EXISTS {name or table} ({cols})"


def _physical(table: str) -> tuple[str, ...]:
    """The stored tables behind a logical table (arrays are split by length)."""
    return ("arrays", "small_arrays") if table == "arrays" else (table,)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc)
    return "lock" in text.lower() or "Conflicting" in text or "being used" in text


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when a library (pyarrow, DuckDB) reports it only in its message."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


def disk_full(exc: BaseException, where: Path, doing: str) -> DiskFullError:
    """The one message for a full disk: what is full, what is kept, how to go on."""
    reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1]
    return DiskFullError(f"the disk holding {where} is full ({reason}) while {doing}. Everything stored before is "
                         "kept. Free space (or raise the quota), then rerun the same command: it resumes from the "
                         "stored results.")


def _slug(text: str) -> str:
    """A file-name-safe, collision-free token for a run id or tensor name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:48]
    return f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


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
        if _not_duckdb(self.db_path) or self.db_path.stat().st_size < 12:
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
        if self.db_path.exists():
            con.execute(f"ATTACH '{_sql_str(self.db_path)}' AS db (READ_ONLY)")
            tables = {r[0] for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_catalog = 'db'").fetchall()}
            # a file folded before KEYED_TABLES existed lacks only those: its core tables still count
            attached = set(SCHEMAS) - set(KEYED_TABLES) <= tables
        for table in SCHEMAS:
            files = self._fragments(table)
            cols = ", ".join(f'"{f.name}"' for f in SCHEMAS[table])
            typed = ", ".join(f'CAST(NULL AS {_SQL_TYPES[f.type]}) AS "{f.name}"' for f in SCHEMAS[table])
            staged = (f"SELECT {cols} FROM read_parquet({_sql_list(files)})" if files
                      else f"SELECT {typed} WHERE false")
            con.execute(f"CREATE TEMP VIEW staged_{table} AS {staged}")
            parts = [f"SELECT {cols} FROM db.main.{name}" for name in _physical(table)
                     if attached and name in tables]
            stored = " UNION ALL ".join(parts) or f"SELECT {typed} WHERE false"
            con.execute(f"CREATE TEMP VIEW stored_{table} AS {stored}")
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
                transient = _is_lock_error(exc) or "No files found" in str(exc) or "No such file" in str(exc)
                if not transient and not isinstance(exc, duckdb.IOException):
                    raise StoreError(f"query failed on {self.db_path}: {exc}") from exc
                if not _is_lock_error(exc) and _not_duckdb(self.db_path):
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
                    con.execute(f"ATTACH '{_sql_str(self.db_path)}' AS db (READ_ONLY)")
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

    def runs(self) -> pd.DataFrame:
        return self.query("SELECT * FROM runs ORDER BY created_at")

    def done_tensors(self, run_id: str) -> set[str]:
        """Names (parents and parts) of tensors of ``run_id`` whose results are complete."""
        df = self.query("SELECT tensor FROM tensors WHERE run_id = ?", [run_id])
        return set(df["tensor"])

    def run_row(self, run_id: str) -> dict | None:
        df = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
        return None if df.empty else df.iloc[0].to_dict()

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

    # ------------------------------------------------------------------ folding
    @contextlib.contextmanager
    def _fold_lock(self, wait: float):
        """Exclusive lock among folding processes (a fold lists fragments, reads them, deletes them: two at
        once would read files the other just removed). Yields False if another fold held it for ``wait`` s."""
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
            fh = open(self.staging / "fold.lock", "a+")
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(exc, self.staging, "folding results into the database") from None
            raise StoreError(f"cannot write in {self.staging}: {exc.strerror or exc}; check the folder is "
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

    def _connect_rw(self, deadline: float) -> duckdb.DuckDBPyConnection | None:
        """A read-write connection to the file, retried with jittered backoff while another process holds
        it; None at the deadline. Refuses a file that is not an opdviz store (nothing is written to it)."""
        if self.db_path.exists():
            self._check_header()
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        delay = 0.02
        while True:
            try:
                con = duckdb.connect(str(self.db_path))
                break
            except duckdb.Error as exc:
                if is_disk_full(exc):
                    raise disk_full(exc, self.db_path, "folding results into the database") from None
                if not _is_lock_error(exc):
                    raise StoreError(f"cannot open {self.db_path} for writing: {exc}. Check the folder is "
                                     "writable and the disk is not full; results stay in "
                                     f"{self.staging} meanwhile.") from exc
                if time.monotonic() >= deadline:
                    return None
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                            "WHERE table_schema = 'main'").fetchall()}
        if tables and not CORE_TABLES <= tables:   # created by someone else between check and connect
            con.close()
            raise StoreError(f"{self.db_path} is a DuckDB database but not an opdviz store; opdviz left it "
                             "untouched. Choose another --db path.")
        return con

    def fold(self, wait: float = 0.0) -> bool:
        """Move finished staged fragments into the ``.duckdb`` file; False if it (or another process's
        fold) held it for longer than ``wait`` seconds, in which case the fragments stay staged and readable.

        Idempotent: rows of each folded (run, tensor) are deleted then inserted in one transaction,
        so a crash between commit and fragment deletion only leaves duplicates that the views and
        the next fold resolve. Folds of several processes take turns (``_fold_lock``).
        """
        if not self._fragments("tensors") and not self._fragments("runs") and \
                not any(self._fragments(t) for t in KEYED_TABLES):
            return True
        deadline = time.monotonic() + wait
        with self._fold_lock(wait) as held:
            if not held:
                return False
            for attempt in range(3):
                try:
                    return self._fold_once(deadline)
                except _Vanished:           # a fold of an older opdviz without the lock removed files
                    if attempt == 2:
                        raise StoreError(f"staged files of {self.db_path} kept disappearing while folding; is "
                                         "another program deleting them?") from None
        return False

    def _fold_once(self, deadline: float) -> bool:
        marker_files = self._fragments("tensors")
        complete = {p.name for p in marker_files}
        batch = {t: [p for p in self._fragments(t) if p.name in complete] for t in TENSOR_TABLES}
        run_files = self._fragments("runs")
        keyed = {t: self._fragments(t) for t in KEYED_TABLES}
        if not marker_files and not run_files and not any(keyed.values()):
            return True
        con = self._connect_rw(deadline)
        if con is None:
            return False
        try:
            for table in SCHEMAS:
                for name in _physical(table):
                    con.execute(_ddl(table, name))
            con.execute("BEGIN TRANSACTION")
            if marker_files:
                keys = f"(SELECT DISTINCT run_id, tensor FROM read_parquet({_sql_list(marker_files)}))"
                for table in TENSOR_TABLES:
                    for name in _physical(table):
                        con.execute(f"DELETE FROM {name} WHERE (run_id, tensor) IN {keys}")
                    if not batch[table]:
                        continue
                    rows = f"SELECT * FROM read_parquet({_sql_list(batch[table])})"
                    if table == "arrays":
                        con.execute(f"INSERT INTO small_arrays BY NAME {rows} WHERE len(\"values\") <= {SMALL_ARRAY}")
                        rows += f" WHERE len(\"values\") > {SMALL_ARRAY} OR \"values\" IS NULL"
                    con.execute(f"INSERT INTO {table} BY NAME {rows}")
            for table, files in keyed.items():
                if files:
                    key = ", ".join(KEYED_TABLES[table])
                    con.execute(f"DELETE FROM {table} WHERE ({key}) IN (SELECT DISTINCT {key} FROM "
                                f"read_parquet({_sql_list(files)}))")
                    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet({_sql_list(files)})")
            if run_files:
                latest = (f"SELECT * FROM read_parquet({_sql_list(run_files)}) QUALIFY row_number() OVER "
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
                raise disk_full(exc, self.db_path, "folding results into the database") from None
            raise StoreError(f"folding results into {self.db_path} failed: {exc}. Nothing was lost: the "
                             f"fragments are still in {self.staging}.") from exc
        finally:
            con.close()
        for files in list(batch.values()) + [run_files] + list(keyed.values()):
            for p in files:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return True

    def delete_run(self, run_id: str) -> None:
        """Remove every stored and staged row of ``run_id`` (used by ``--overwrite``)."""
        slug = _slug(run_id)
        with self._fold_lock(30.0) as held:
            if not held:
                raise StoreError(f"cannot delete run {run_id!r}: another process kept folding into "
                                 f"{self.db_path} for 30 s; retry.")
            for table in SCHEMAS:
                for p in self._fragments(table):
                    if p.name.startswith(slug + "__") or p.name == slug + ".parquet":
                        p.unlink(missing_ok=True)
            if not self.db_path.exists():
                return
            con = self._connect_rw(time.monotonic() + 10.0)
            if con is None:
                raise StoreError(f"cannot delete run {run_id!r}: {self.db_path} is in use by another process. "
                                 "Close the dashboard's job or retry.")
            with contextlib.closing(con):
                for table in SCHEMAS:
                    for name in _physical(table):
                        con.execute(_ddl(table, name))
                        if table not in KEYED_TABLES:
                            con.execute(f"DELETE FROM {name} WHERE run_id = ?", [run_id])


class _Vanished(Exception):
    """A staged fragment listed for a fold disappeared before it was read."""


class RunWriter:
    """Writes one run's fragments. The run is identified by ``run_id`` (its user-given name)."""

    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self.slug = _slug(run_id)
        self._run_seq = 0
        # a test hook called as inject(table, temp_path) before each fragment is written (fault injection)
        self.inject: Callable[[str, Path], None] | None = None
        for table in SCHEMAS:
            try:
                (store.staging / table).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full(exc, store.staging, f"starting run {run_id!r}") from None
                raise StoreError(f"cannot create the staging folder {store.staging}: {exc}. "
                                 "Choose a writable --db location.") from exc

    def _write(self, table: str, rows: list[dict], name: str) -> None:
        schema = SCHEMAS[table]
        data = {f.name: [r.get(f.name) for r in rows] for f in schema}
        final = self.store.staging / table / name
        tmp = final.with_name(final.name + f".{os.getpid()}.tmp")
        try:
            if self.inject is not None:
                self.inject(table, tmp)
            pq.write_table(pa.table(data, schema=schema), tmp, compression="zstd")
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full(exc, self.store.staging, f"writing results of run {self.run_id!r}") from None
            raise StoreError(f"cannot write results to {final.parent}: {exc}. Free disk space or choose "
                             "another --db location, then rerun the same command to resume.") from exc

    def write_keyed(self, table: str, key: str, rows: list[dict]) -> None:
        """Write all rows of one key of a ``KEYED_TABLES`` table (e.g. one tensor of an overlap pair) as
        one fragment; rewriting the same ``key`` replaces it."""
        self._write(table, rows, f"{self.slug}__{_slug(key)}.parquet")

    def write_run(self, row: dict) -> None:
        """Write (a new version of) the run row; the newest ``updated_at`` wins in the views."""
        row = {**row, "run_id": self.run_id, "updated_at": row.get("updated_at") or now()}
        self._run_seq += 1
        self._write("runs", [row], f"{self.slug}__{time.time_ns():020d}_{self._run_seq:06d}.parquet")

    def write_tensor(self, key: str, tensors: list[dict], metrics: list[dict], arrays: list[dict],
                     failures: list[dict]) -> None:
        """Write the results of one stored tensor ``key`` (its rows and its parts' rows), atomically
        per table, the ``tensors`` fragment last."""
        name = f"{self.slug}__{_slug(key)}.parquet"
        by_table = {"tensors": tensors, "metrics": metrics, "arrays": arrays, "failures": failures}
        for table in WRITE_ORDER:
            rows = [{**r, "run_id": self.run_id} for r in by_table[table]]
            if rows or table == "tensors":
                self._write(table, rows, name)


def _sql_str(path: Path | str) -> str:
    return str(path).replace("'", "''")


def _sql_list(files: list[Path]) -> str:
    return "[" + ", ".join(f"'{_sql_str(p)}'" for p in files) + "]"


def dumps(obj) -> str:
    """JSON for provenance columns (options, versions, extra)."""
    return json.dumps(obj, sort_keys=True, default=str)


def lock_path(store: Store, run_id: str) -> Path:
    """The file a job holds locked (and names its pid and host in) while it computes ``run_id``."""
    return store.staging / "locks" / f"{_slug(run_id)}.lock"


def computing(store: Store, run_id: str) -> bool | None:
    """Whether the process computing ``run_id`` is alive: True/False when its lock file names a process on
    this host, None when that cannot be told (no lock file, another host)."""
    try:
        text = lock_path(store, run_id).read_text()
    except OSError:
        return None
    m = re.fullmatch(r"pid (\d+)(?: on (.+))?", text.strip())
    if not m or (m.group(2) and m.group(2) != socket.gethostname()):
        return None
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _not_duckdb(path: Path) -> bool:
    """True when ``path`` exists but does not start with DuckDB's file header."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return len(head) >= 12 and head[8:12] != b"DUCK"


class _Connections:
    """A small pool of idle in-memory DuckDB connections with the union views, per store signature (file
    stamp, staged fragment lists). Opening a connection and creating its views costs ~25 ms, attaching
    the file ~1 ms; the file is never left attached. A query borrows a connection (one thread at a time
    uses it) and gives it back; at most ``max_idle`` stay open, and every idle one is closed before this
    process forks (a forked child that runs Python code before exec, as Ray's process launcher does,
    crashed while dozens of DuckDB instances were alive)."""

    def __init__(self, max_idle: int = 4):
        self.max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: list[tuple[Path, tuple, duckdb.DuckDBPyConnection]] = []

    @contextlib.contextmanager
    def borrow(self, path: Path, signature: tuple, build: Callable):
        """Yield (connection, True if ``build`` just made it and left the file attached)."""
        con = None
        with self._lock:
            for i, (p, sig, c) in enumerate(self._idle):
                if p == path and sig == signature:
                    con = c
                    del self._idle[i]
                    break
        fresh = con is None
        if fresh:
            con = duckdb.connect(":memory:")
            try:
                build(con)
            except BaseException:
                con.close()
                raise
        ok = False
        try:
            yield con, fresh
            ok = True
        finally:
            self._give_back(path, signature, con, ok)

    def _give_back(self, path: Path, signature: tuple, con, ok: bool) -> None:
        stale = [] if ok else [con]
        with self._lock:
            if ok:
                # entries of an older signature of this store are useless from now on
                stale += [c for p, sig, c in self._idle if p == path and sig != signature]
                self._idle = [e for e in self._idle if not (e[0] == path and e[1] != signature)]
                self._idle.append((path, signature, con))
                while len(self._idle) > self.max_idle:
                    stale.append(self._idle.pop(0)[2])
        for c in stale:
            with contextlib.suppress(duckdb.Error):
                c.close()

    def close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, _, c in idle:
            with contextlib.suppress(duckdb.Error):
                c.close()


_CONNECTIONS = _Connections()
os.register_at_fork(before=_CONNECTIONS.close_idle)


def _frame_bytes(df: pd.DataFrame) -> int:
    """Approximate memory of a query result, list columns (numpy arrays per row) included."""
    size = int(df.memory_usage(index=True, deep=False).sum())
    for col in df.columns:
        if df[col].dtype == object and len(df):
            size += sum(getattr(v, "nbytes", 64) for v in df[col])
    return size


class QueryMemo:
    """A bounded, thread-safe memo of query results keyed by (store, version, sql, params).

    Concurrent callers of the same key wait for the first one instead of running the query again (the
    dashboard builds a page's figures in parallel, and several read the same rows). Results are returned
    as shallow copies (pandas copy-on-write keeps the stored frame intact)."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._data: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._pending: dict = {}
        self.bytes = 0

    def get(self, key, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        while True:
            with self._lock:
                if key in self._data:
                    self._data.move_to_end(key)
                    return self._data[key].copy(deep=False)
                event = self._pending.get(key)
                if event is None:
                    event = self._pending[key] = threading.Event()
                    owner = True
                else:
                    owner = False
            if not owner:
                event.wait()
                continue            # the owner stored it (or failed: then this caller runs it itself)
            try:
                df = compute()
                self._put(key, df)
                return df.copy(deep=False)
            finally:
                with self._lock:
                    self._pending.pop(key, None)
                event.set()

    def _put(self, key, df: pd.DataFrame) -> None:
        size = _frame_bytes(df)
        if size > self.max_bytes:
            return
        with self._lock:
            self._data[key] = df
            self._sizes[key] = size
            self.bytes += size
            while self.bytes > self.max_bytes and self._data:
                old, _ = self._data.popitem(last=False)
                self.bytes -= self._sizes.pop(old)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()
            self.bytes = 0
