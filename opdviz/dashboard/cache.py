"""The dashboard's cached reads: the current ``View``, cached store queries, and figures built in the background.

Caching: every query goes through ``st.cache_data`` keyed on (database path, a *stamp* of the file's
and the staging folder's mtimes, the arguments), so results written by a running job show up on the
next rerun while an unchanged store is never queried twice; below that, ``MEMO`` keeps the raw SQL
results (same stamp) so figures that read the same rows share one query. A page's figures are built on a
small thread pool (``Warmer``, one per server process) that keeps its own cache of built figures; then a
background thread warms the other pages' default figures for the same selection (set ``OPDVIZ_PREWARM=0``
to switch that off, e.g. for benchmarks). The pool and warm threads never call Streamlit: they run the
library's functions and hand their results back as futures. No DuckDB connection is kept open here:
``Store.query`` opens an in-memory one per call (a kept connection would lock the job out).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import streamlit as st

from opdviz.errors import OpdvizError
from opdviz.store import listing, queries
from opdviz.store import QueryMemo, Store
from opdviz.store import Selection
from opdviz.store.across import overlap_pairs, trajectories
from opdviz.views import registry, tables
from opdviz.views.across import top_overlaps
from opdviz.views.context import ViewContext

from opdviz.dashboard.text import md


@dataclass(frozen=True)
class View:
    """What a page draws: the database, its stamp (cache key), the filter and the view context."""

    db: str
    stamp: tuple
    sel: Selection
    ctx: ViewContext

    @property
    def store(self) -> Store:
        return Store(self.db)


def with_ctx(view: View, **changes) -> View:
    """``view`` with some of its context's fields replaced (a page's own choices: tensor, metric…)."""
    return dataclasses.replace(view, ctx=dataclasses.replace(view.ctx, **changes))


def stamp(db: str) -> tuple:
    """Modification times that change whenever results are written or folded (the cache key)."""
    return Store(db).version()


# Query results shared by every session of this server process: figures of one page read many of the
# same rows (tensor lists, a tensor's arrays), built in parallel; the memo runs each query once.
MEMO = QueryMemo(max_bytes=int(os.environ.get("OPDVIZ_MEMO_MB", "512")) << 20)


def _build(store: Store, key: str, sel: Selection, ctx: ViewContext):
    return registry.figure_spec(key).build(store, sel, ctx)


QUERIES: dict[str, Callable] = {
    "runs": queries.runs,
    "facets": listing.facets,
    "criteria": listing.criteria,
    "metric_names": queries.metric_names,
    "tensor_names": listing.tensor_names,
    "not_ok": listing.not_ok,
    "largest_tensor": listing.largest_tensor,
    "n_top_done": listing.n_top_done,
    "overview_table": tables.overview_table,
    "approx_counts": tables.approx_counts,
    "provenances": tables.provenances,
    "figure": _build,
}


def direct(name: str, db: str, *args):
    """``QUERIES[name](Store(db), *args)``, uncached by Streamlit (for threads without a script context)."""
    return QUERIES[name](Store(db, memo=MEMO), *args)


@st.cache_data(show_spinner=False, max_entries=1024)
def cached(name: str, db: str, stamp_: tuple, args: tuple):
    """``direct(name, db, *args)``, cached per store stamp (raises the library's errors)."""
    return direct(name, db, *args)


def query(name: str, db: str, stamp_: tuple, *args):
    """A cached call of ``QUERIES[name](Store(db), *args)``; a library error stops the page with its message."""
    try:
        return cached(name, db, stamp_, args)
    except OpdvizError as exc:
        st.error(md(exc))
        st.stop()


@st.cache_data(show_spinner=False, max_entries=256)
def across(name: str, db: str, stamp_: tuple, *args):
    """The Overlap and Trajectory pages' reads: the stored pairs (``pairs``), the top tensors (``top``), the
    trajectories (``trajectories``), or the figure ``name`` of ``opdviz.views.across``; cached per stamp."""
    store = Store(db)
    reads = {"pairs": overlap_pairs, "top": top_overlaps, "trajectories": trajectories}
    if name in reads:
        return reads[name](store, *args)
    return registry.figure_spec(name).build(store, *args)


class Warmer:
    """One per server process: builds figures on a small thread pool, never the same one twice at once
    (a page and the background warmer share in-flight builds), keeps the built ones (the most recent
    ``max_entries``, stored pickled so every reader gets its own copy, as ``st.cache_data`` does), and
    warms, one figure at a time, every page's default view for the newest selection a user looked at.
    Older warm requests are dropped. Its threads call only the library, never Streamlit."""

    def __init__(self, max_entries: int = 1024):
        self.pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="opdviz-fig")
        self._lock = threading.RLock()    # a done future runs its callback (_forget) inside submit()
        self._inflight: dict[tuple, Future] = {}
        self._built: OrderedDict[tuple, bytes] = OrderedDict()
        self._max_entries = max_entries
        self._wanted: tuple | None = None
        self._next: tuple[View, str] | None = None
        self._thread: threading.Thread | None = None

    def submit(self, key: tuple) -> Future:
        """The (figure, data) of ``key`` = (db, stamp, figure key, Selection, ViewContext), as a Future."""
        with self._lock:
            if key in self._built:
                self._built.move_to_end(key)
                done: Future = Future()
                done.set_result(pickle.loads(self._built[key]))
                return done
            fut = self._inflight.get(key)
            if fut is None:
                fut = self.pool.submit(self._build, key)
                self._inflight[key] = fut
                fut.add_done_callback(lambda _f, k=key: self._forget(k))
        return fut

    def _build(self, key: tuple):
        db, _stamp, fig_key, sel, vctx = key
        result = direct("figure", db, fig_key, sel, vctx)
        blob = pickle.dumps(result)
        with self._lock:
            self._built[key] = blob
            while len(self._built) > self._max_entries:
                self._built.popitem(last=False)
        return result

    def clear(self) -> None:
        """Forget the built figures (benchmarks time a cold page)."""
        with self._lock:
            self._built.clear()

    def _forget(self, key: tuple) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def warm(self, view: View, exclude: str) -> None:
        if os.environ.get("OPDVIZ_PREWARM", "1") == "0":
            return
        with self._lock:
            key = (view.db, view.stamp, view.sel, view.ctx.criterion)
            if self._wanted == key:
                return
            self._wanted = key
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, args=(view, exclude), daemon=True,
                                                name="opdviz-warm")
                self._thread.start()
            else:
                self._next = (view, exclude)

    def _loop(self, view: View, exclude: str) -> None:
        try:
            while view is not None:
                self._warm_one(view, exclude)
                with self._lock:
                    nxt, self._next = self._next, None
                view, exclude = nxt if nxt else (None, "")
        finally:
            with self._lock:
                self._thread = None

    def _warm_one(self, view: View, exclude: str) -> None:
        key = (view.db, view.stamp, view.sel, view.ctx.criterion)
        ctx = ViewContext(criterion=view.ctx.criterion)   # the pages' defaults (Compare's differ: skipped)
        try:
            tensor = direct("largest_tensor", view.db, view.sel)
        except OpdvizError:
            return
        for spec in (f for f in registry.FIGURES if f.page in registry.RUN_PAGES):
            with self._lock:
                if self._wanted != key:
                    return
            if spec.page in (exclude, "compare"):
                continue
            try:
                page_ctx = dataclasses.replace(ctx, tensor=tensor) if spec.page == "tensor" else ctx
                future = self.submit((view.db, view.stamp, spec.key, view.sel, page_ctx))
            except RuntimeError:          # the pool is shut down: the server is exiting
                return
            try:
                future.result()
            except OpdvizError:           # the store went away or is busy: the page will say so
                return


@st.cache_resource(show_spinner=False)
def warmer() -> Warmer:
    """The server process's figure builder (shared by every session)."""
    return Warmer()
