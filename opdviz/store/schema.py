"""The store's tables: their Arrow schemas, SQL types and DDL, and the names of staged fragment files.

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

Both array tables carry one more column, ``run_tensor`` (``ARRAY_KEY``: run_id, the unit separator
U+001F, tensor), with an index on it (``INDEXES``): a drill-down asks for every array of a few tensors
in the runs a page draws, and without the index DuckDB decodes the whole ``values`` column of the file to
find them (about 1 s on a 673 MB store). DuckDB fetches rows through an index only for a filter on that
one column, so the key holds both: an index on ``tensor`` alone fetched the tensor's rows of every run (a
50-run sweep: 1100 rows, 5.4 M values, 80 ms) where a page draws 12 (264 rows, 21 ms). Every fold adds the
column and the index when a file lacks them (filling the key of the rows already there), so a store
written before they existed gets them when a job next writes to it; until then it reads the same, only
slower. The key is not part of the logical ``arrays`` table (``SCHEMAS``, the fragments, the views).

``overlap`` and ``trajectory`` are keyed otherwise than (run_id, tensor): see ``KEYED_TABLES``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa

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

# the physical array tables' key column (see the module docstring) and the SQL that makes it
ARRAY_KEY = "run_tensor"
ARRAY_KEY_SQL = "run_id || chr(31) || tensor"
# physical table → the column its index is on (see the module docstring)
INDEXES = {"arrays": ARRAY_KEY, "small_arrays": ARRAY_KEY}
# a query fetches rows through an index when at most this many match (DuckDB's index_scan_max_count,
# 2048 by default; a read connection sets this): one drill-down tensor of a 50-run sweep with its
# 21 arrays a run (1050 rows) stays under it with a second tensor or its fused parts; measured, fetching
# up to ~6000 rows through the index is no slower than the scan it replaces
INDEX_SCAN_ROWS = 4096

SQL_TYPES = {pa.int64(): "BIGINT", pa.float64(): "DOUBLE", pa.string(): "VARCHAR", pa.bool_(): "BOOLEAN",
              _ts: "TIMESTAMPTZ", pa.list_(_i64): "BIGINT[]", pa.list_(_f64): "DOUBLE[]"}


def ddl(table: str, name: str | None = None) -> str:
    """CREATE TABLE for ``table``'s schema, named ``name`` (default: ``table``)."""
    cols = ", ".join(f'"{f.name}" {SQL_TYPES[f.type]}' for f in SCHEMAS[table])
    return f"CREATE TABLE IF NOT EXISTS {name or table} ({cols})"


def index_ddl(name: str) -> str:
    """CREATE INDEX for the physical table ``name`` (see ``INDEXES``)."""
    return f"CREATE INDEX IF NOT EXISTS {name}_{INDEXES[name]} ON {name} ({INDEXES[name]})"


def array_key(run_id: str, tensor: str) -> str:
    """The ``ARRAY_KEY`` value of one run's tensor (what ``ARRAY_KEY_SQL`` computes)."""
    return f"{run_id}\x1f{tensor}"


def physical(table: str) -> tuple[str, ...]:
    """The stored tables behind a logical table (arrays are split by length)."""
    return ("arrays", "small_arrays") if table == "arrays" else (table,)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def slug(text: str) -> str:
    """A file-name-safe, collision-free token for a run id or tensor name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:48]
    return f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def sql_str(path: Path | str) -> str:
    return str(path).replace("'", "''")


def sql_list(files: list[Path]) -> str:
    return "[" + ", ".join(f"'{sql_str(p)}'" for p in files) + "]"


def dumps(obj) -> str:
    """JSON for provenance columns (options, versions, extra)."""
    return json.dumps(obj, sort_keys=True, default=str)
