"""``RunWriter``: a job writes one run's results as immutable Parquet fragments under ``<db>.staging/``.

Each fragment is written to a temp name then ``os.replace``d; of one tensor's fragments the ``tensors``
one comes last (the commit marker the union views wait for). ``opdviz.store.fold`` later moves them into
the ``.duckdb`` file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from opdviz.errors import StoreError
from opdviz.store.core import Store
from opdviz.store.disk import disk_full, is_disk_full
from opdviz.store.schema import SCHEMAS, WRITE_ORDER, now, slug


class RunWriter:
    """Writes one run's fragments. The run is identified by ``run_id`` (its user-given name)."""

    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self.slug = slug(run_id)
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
        self._write(table, rows, f"{self.slug}__{slug(key)}.parquet")

    def write_run(self, row: dict) -> None:
        """Write (a new version of) the run row; the newest ``updated_at`` wins in the views."""
        row = {**row, "run_id": self.run_id, "updated_at": row.get("updated_at") or now()}
        self._run_seq += 1
        self._write("runs", [row], f"{self.slug}__{time.time_ns():020d}_{self._run_seq:06d}.parquet")

    def write_tensor(self, key: str, tensors: list[dict], metrics: list[dict], arrays: list[dict],
                     failures: list[dict]) -> None:
        """Write the results of one stored tensor ``key`` (its rows and its parts' rows), atomically
        per table, the ``tensors`` fragment last."""
        name = f"{self.slug}__{slug(key)}.parquet"
        by_table = {"tensors": tensors, "metrics": metrics, "arrays": arrays, "failures": failures}
        for table in WRITE_ORDER:
            rows = [{**r, "run_id": self.run_id} for r in by_table[table]]
            if rows or table == "tensors":
                self._write(table, rows, name)
