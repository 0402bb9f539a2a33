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
through the views ``runs``, ``tensors``, ``metrics``, ``arrays``, ``failures``, ``overlap``, ``trajectory``.

Only this package speaks SQL. Its modules, by role:

- ``schema``: the tables (Arrow schemas, SQL types, DDL) and fragment names; ``core``: ``Store``, the reader
  (union views, ``query``, checks); ``pool`` and ``memo``: pooled connections and the query-result memo;
  ``writer``: ``RunWriter``, which a job writes fragments with; ``fold``: folding fragments into the file;
  ``disk``: full-disk and foreign-file detection; ``locks``: a job's lock file.
- Reads, each a function (store, Selection, …) → DataFrame: ``selection`` (``Selection``), ``queries``
  (runs, tensors, metrics, arrays, the export), ``summary`` (group aggregates pooled by the catalog's
  rules), ``across`` (overlap and trajectory tables), ``lab`` (the lab sweep's runs).

    from opdviz.store import Selection, Store
    from opdviz.store import queries
    queries.long_metrics(Store("data/opdviz.duckdb"), Selection(runs=("opd",)), ("stable_rank",))
"""

from opdviz.store.core import Store
from opdviz.store.disk import disk_full, is_disk_full
from opdviz.store.locks import computing, lock_path
from opdviz.store.memo import QueryMemo
from opdviz.store.schema import SCHEMAS, dumps, now, slug
from opdviz.store.selection import Selection
from opdviz.store.writer import RunWriter

__all__ = ["SCHEMAS", "QueryMemo", "RunWriter", "Selection", "Store", "computing", "disk_full", "dumps",
           "is_disk_full", "lock_path", "now", "slug"]
