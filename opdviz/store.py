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

``overlap`` and ``trajectory`` (opdviz.overlap, opdviz.trajectory) are keyed otherwise than
(run_id, tensor): see ``KEYED_TABLES``. Each of their fragments is one file written whole (one
``os.replace``, so no marker is needed) and folding replaces the stored rows of its keys.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import re
import time
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StoreError

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
# fragments of a tensor are written in this order; "tensors" last marks the tensor complete
WRITE_ORDER = ("arrays", "metrics", "failures", "tensors")

_SQL_TYPES = {pa.int64(): "BIGINT", pa.float64(): "DOUBLE", pa.string(): "VARCHAR", pa.bool_(): "BOOLEAN",
              _ts: "TIMESTAMPTZ", pa.list_(_i64): "BIGINT[]", pa.list_(_f64): "DOUBLE[]"}


def _ddl(table: str) -> str:
    cols = ", ".join(f'"{f.name}" {_SQL_TYPES[f.type]}' for f in SCHEMAS[table])
    return f"CREATE TABLE IF NOT EXISTS {table} ({cols})"


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc)
    return "lock" in text.lower() or "Conflicting" in text or "being used" in text


def _slug(text: str) -> str:
    """A file-name-safe, collision-free token for a run id or tensor name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:48]
    return f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


class Store:
    """A result store at ``db_path`` (``.duckdb``) with its staging folder ``<db_path>.staging``.

    Reading never blocks a writer for longer than one query; writing goes through ``RunWriter``.
    """

    def __init__(self, db_path: str | Path):
        self.db_path = Path(db_path)
        self.staging = Path(str(self.db_path) + ".staging")

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return self.db_path.exists() or any(self._fragments("tensors")) or any(self._fragments("runs"))

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
            stored = (f"SELECT {cols} FROM db.main.{table}" if attached and table in tables
                      else f"SELECT {typed} WHERE false")
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
        """Run ``sql`` against the views and return a DataFrame.

        Opens an in-memory connection per call (a kept connection would lock the job out); retries
        with jittered backoff while a fold holds the file or a fragment disappears under us.
        """
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                with contextlib.closing(duckdb.connect(":memory:")) as con:
                    self._views(con)
                    return con.execute(sql, params or []).df()
            except (duckdb.IOException, duckdb.InvalidInputException, duckdb.CatalogException) as exc:
                transient = _is_lock_error(exc) or "No files found" in str(exc) or "No such file" in str(exc)
                if not transient and not isinstance(exc, duckdb.IOException):
                    raise StoreError(f"query failed on {self.db_path}: {exc}") from exc
                if time.monotonic() > deadline:
                    raise StoreError(f"{self.db_path} stayed busy for {timeout:.0f}s ({exc}); "
                                     "is another process folding a large run? Try again.") from exc
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)

    def runs(self) -> pd.DataFrame:
        return self.query("SELECT * FROM runs ORDER BY created_at")

    def done_tensors(self, run_id: str) -> set[str]:
        """Names (parents and parts) of tensors of ``run_id`` whose results are complete."""
        df = self.query("SELECT tensor FROM tensors WHERE run_id = ?", [run_id])
        return set(df["tensor"])

    def run_row(self, run_id: str) -> dict | None:
        df = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
        return None if df.empty else df.iloc[0].to_dict()

    # ------------------------------------------------------------------ folding
    def fold(self, wait: float = 0.0) -> bool:
        """Move finished staged fragments into the ``.duckdb`` file; False if it stayed locked.

        Idempotent: rows of each folded (run, tensor) are deleted then inserted in one transaction,
        so a crash between commit and fragment deletion only leaves duplicates that the views and
        the next fold resolve.
        """
        marker_files = self._fragments("tensors")
        complete = {p.name for p in marker_files}
        batch = {t: [p for p in self._fragments(t) if p.name in complete] for t in TENSOR_TABLES}
        run_files = self._fragments("runs")
        keyed = {t: self._fragments(t) for t in KEYED_TABLES}
        if not marker_files and not run_files and not any(keyed.values()):
            return True
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait
        delay = 0.02
        while True:
            try:
                con = duckdb.connect(str(self.db_path))
                break
            except duckdb.IOException as exc:
                if not _is_lock_error(exc):
                    raise StoreError(f"cannot open {self.db_path} for writing: {exc}. Check the folder is "
                                     "writable and the disk is not full; results stay in "
                                     f"{self.staging} meanwhile.") from exc
                if time.monotonic() >= deadline:
                    return False
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)
        try:
            for table in SCHEMAS:
                con.execute(_ddl(table))
            con.execute("BEGIN TRANSACTION")
            if marker_files:
                keys = f"(SELECT DISTINCT run_id, tensor FROM read_parquet({_sql_list(marker_files)}))"
                for table in TENSOR_TABLES:
                    con.execute(f"DELETE FROM {table} WHERE (run_id, tensor) IN {keys}")
                    if batch[table]:
                        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet({_sql_list(batch[table])})")
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
        for table in SCHEMAS:
            for p in self._fragments(table):
                if p.name.startswith(slug + "__") or p.name == slug + ".parquet":
                    p.unlink(missing_ok=True)
        if not self.db_path.exists():
            return
        try:
            with contextlib.closing(duckdb.connect(str(self.db_path))) as con:
                for table in SCHEMAS:
                    con.execute(_ddl(table))
                    if table not in KEYED_TABLES:
                        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
        except duckdb.IOException as exc:
            raise StoreError(f"cannot delete run {run_id!r}: {self.db_path} is in use ({exc}). "
                             "Close the dashboard's job or retry.") from exc


class RunWriter:
    """Writes one run's fragments. The run is identified by ``run_id`` (its user-given name)."""

    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self.slug = _slug(run_id)
        self._run_seq = 0
        for table in SCHEMAS:
            try:
                (store.staging / table).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the staging folder {store.staging}: {exc}. "
                                 "Choose a writable --db location.") from exc

    def _write(self, table: str, rows: list[dict], name: str) -> None:
        schema = SCHEMAS[table]
        data = {f.name: [r.get(f.name) for r in rows] for f in schema}
        final = self.store.staging / table / name
        tmp = final.with_name(final.name + f".{os.getpid()}.tmp")
        try:
            pq.write_table(pa.table(data, schema=schema), tmp, compression="zstd")
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
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
