"""Shared dashboard UI: sidebar filters ↔ URL query params, cached queries, figure + export rows, notices.

The library (``opdviz/``) never imports streamlit; everything Streamlit-specific lives here and in the
thin page files. ``app.py`` calls ``sidebar()`` on every rerun; a page calls ``begin()`` for its header
and the current ``View`` (store path, Selection, ViewContext), then ``figures()`` to draw its figures.

Caching: every query goes through ``st.cache_data`` keyed on (database path, a *stamp* of the file's
and the staging folder's mtimes, the arguments), so results written by a running job show up on the
next rerun while an unchanged store is never queried twice; below that, ``MEMO`` keeps the raw SQL
results (same stamp) so figures that read the same rows share one query. A page's figures are built on a small
thread pool; then a background thread warms the other pages' default figures for the same selection
(set ``OPDVIZ_PREWARM=0`` to switch that off, e.g. for benchmarks). No DuckDB connection is kept open here:
``Store.query`` opens an in-memory one per call (a kept connection would lock the job out).

The *Database* is chosen from a list of the stores under the operator's store roots (``opdviz.io.roots``:
``OPDVIZ_STORE_ROOTS``, default the folder of ``$OPDVIZ_DB`` and ``data/``); a ``db`` URL parameter naming
anything else gets one message (``roots.REFUSED``) and the operator's store, and no file is looked up.
Text from the store or the browser goes into Markdown only through ``md()`` / ``code()`` (shown literally).

Query-param keys (a view can be bookmarked): ``db``, ``run`` (repeated), ``tower``, ``block``,
``module`` (repeated), ``layers`` (``LO-HI``), ``crit``, and per page ``tensor`` (Tensor),
``tensors`` (Spectra and Geometry, repeated), ``metric``, ``a``, ``b`` (Compare), ``pair`` (Overlap), ``traj``,
``tmetric`` (Trajectory). Defaults are left out of the URL; a page's keys leave it when another page opens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st
from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

from opdviz.views import export as figexport
from opdviz.views import formatting
from opdviz.store import queries
from opdviz.io import roots
from opdviz.views import registry, tables
from opdviz.errors import OpdvizError
from opdviz.options import DEFAULT_CRITERIA
from opdviz.store import QueryMemo, Selection, Store, slug
from opdviz.views.compare import GROUP_COLUMNS
from opdviz.views.context import ViewContext

DEFAULT_DB = "data/opdviz.duckdb"
DEFAULT_CRITERION = ViewContext().criterion
# the stored sparsity_<criterion> names, in the order the sidebar lists them
_CRITERION_RE = re.compile(r"^sparsity_(exact|abs_[0-9.e+-]+|relrms_[0-9.e+-]+|bf16_[0-9.e+-]+)$")
FALLBACK_CRITERIA = DEFAULT_CRITERIA
COMMON_PARAMS = ("db", "run", "tower", "block", "module", "layers", "crit")
PAGE_PARAMS = {"tensor": ("tensor",), "spectra": ("tensors",), "geometry": ("tensors",),
               "compare": ("metric", "a", "b"), "overlap": ("pair",), "trajectory": ("traj", "tmetric")}
_STATE = "_opdviz_shared"

HOW_TO_GET_DATA = """\
**How to get data**

* try the dashboard on a small generated example: `opdviz demo`
* analyse your own checkpoints: {compute}
  (BASE and POST: a `.safetensors` file or a Hugging Face model folder)
* or queue one from the browser on the **New analysis** page (below),
* or choose another store in the sidebar's *Database* list (the stores under the folders the operator
  offers: `OPDVIZ_STORE_ROOTS`).

Then reload this page.
"""

FORMATS = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf", "html": "text/html",
           "csv": "text/csv", "parquet": "application/vnd.apache.parquet"}


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


# ----------------------------------------------------------------------------------- literal text
_MD_PUNCT = re.compile(r"([!-/:-@\[-`{-~])")     # every ASCII punctuation character: all escapable in CommonMark
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text) -> str:
    """``text`` with control and format characters (newlines, bidi overrides, NUL…) written as escapes."""
    return "".join(_NAMED.get(c, f"\\u{ord(c):04x}") if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c
                   for c in str(text))


def md(text) -> str:
    """Untrusted ``text`` (run names, method labels, metric keys, paths, messages) for any Streamlit call
    that renders Markdown (``st.markdown``, ``caption``, ``info``/``error``…, expander and widget labels,
    progress text, toasts): every ASCII punctuation character is backslash-escaped, so emphasis, links,
    headings, HTML, ``$…$`` math, ``:emoji:`` / ``:material/…:`` and ``:color[…]`` stay literal text."""
    return _MD_PUNCT.sub(r"\\\1", visible(text))


def md_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` for ``st.table`` (whose cells render Markdown): text cells and the index through ``md``."""
    out = df.map(lambda v: md(v) if isinstance(v, str) else v)
    out.index = [md(i) if isinstance(i, str) else i for i in out.index]
    out.index.name = df.index.name
    return out


def code(text) -> str:
    """Untrusted ``text`` as an inline code span (paths, tensor names): fenced by more backticks than it
    contains, so nothing in it can close the span."""
    text = visible(text)
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


# ----------------------------------------------------------------------------------- caching
def stamp(db: str) -> tuple:
    """Modification times that change whenever results are written or folded (the cache key)."""
    return Store(db).version()


# Query results shared by every session of this server process: figures of one page read many of the
# same rows (tensor lists, a tensor's arrays), built in parallel; the memo runs each query once.
MEMO = QueryMemo(max_bytes=int(os.environ.get("OPDVIZ_MEMO_MB", "512")) << 20)


def _facets(store: Store) -> pd.DataFrame:
    return store.query("SELECT DISTINCT run_id, tower, block, module, layer FROM tensors WHERE status = 'ok'")


def _criteria(store: Store) -> list[str]:
    found = [m[len("sparsity_"):] for m in queries.metric_names(store) if _CRITERION_RE.match(m)]
    order = {c: i for i, c in enumerate(FALLBACK_CRITERIA)}
    return sorted(found, key=lambda c: (order.get(c, len(order)), c)) or list(FALLBACK_CRITERIA)


def _tensor_names(store: Store, sel: Selection, two_d: bool) -> list[str]:
    df = queries.tensors(store, sel)
    if two_d:
        df = df[df["cols"].notna()]
    return list(dict.fromkeys(df["tensor"]))


def _largest_tensor(store: Store, sel: Selection) -> str | None:
    """The Tensor page's default: the largest matrix inside a layer (else the largest matrix)."""
    df = queries.tensors(store, sel)
    df = df[df["cols"].notna()]
    if df.empty:
        return None
    df = df.assign(no_layer=df["layer"].isna())
    return str(df.sort_values(["no_layer", "numel", "seq"], ascending=[True, False, True])["tensor"].iloc[0])


def _not_ok(store: Store, run_id: str) -> pd.DataFrame:
    df = queries.all_tensors(store, run_id)
    df = df[df["status"] != "ok"][["tensor", "status", "reason"]]
    fails = queries.failures(store, run_id)
    if not fails.empty:
        df = df.merge(fails[["tensor", "stage", "error", "message"]], on="tensor", how="left")
    return df.reset_index(drop=True)


def _n_top_done(store: Store, run_id: str) -> int:
    df = store.query("SELECT count(*) AS n FROM tensors WHERE run_id = ? AND coalesce(parent, '') = ''", [run_id])
    return int(df["n"].iloc[0])


def _build(store: Store, key: str, sel: Selection, ctx: ViewContext):
    return registry.figure_spec(key).build(store, sel, ctx)


QUERIES: dict[str, Callable] = {
    "runs": queries.runs,
    "facets": _facets,
    "criteria": _criteria,
    "metric_names": queries.metric_names,
    "tensor_names": _tensor_names,
    "not_ok": _not_ok,
    "largest_tensor": _largest_tensor,
    "n_top_done": _n_top_done,
    "overview_table": tables.overview_table,
    "approx_counts": tables.approx_counts,
    "provenance": tables.provenance,
    "figure": _build,
}


@st.cache_data(show_spinner=False, max_entries=1024)
def _cached(name: str, db: str, stamp_: tuple, args: tuple):
    return QUERIES[name](Store(db, memo=MEMO), *args)


def query(name: str, db: str, stamp_: tuple, *args):
    """A cached call of ``QUERIES[name](Store(db), *args)``; a library error stops the page with its message."""
    try:
        return _cached(name, db, stamp_, args)
    except OpdvizError as exc:
        st.error(md(exc))
        st.stop()


# ----------------------------------------------------------------------------------- query params
def _param_list(key: str) -> list[str]:
    return [v for v in st.query_params.get_all(key) if v != ""]


def sync_params(values: dict[str, str | Iterable[str] | None]) -> None:
    """Write ``values`` into the URL (None/empty removes the key); untouched keys stay as they are."""
    for key, value in values.items():
        want = [] if value is None else [value] if isinstance(value, str) else [str(v) for v in value]
        if want == _param_list(key):
            continue
        if want:
            st.query_params[key] = want if len(want) > 1 else want[0]
        elif key in st.query_params:
            del st.query_params[key]


def _init(key: str, value) -> None:
    """Seed a widget's state once (first load of the session: from the URL)."""
    if key not in st.session_state:
        st.session_state[key] = value


def criterion_label(c: str) -> str:
    """Human label of a stored criterion name (``abs_1e-5`` → ``|ΔW| > 1e-5``)."""
    kind, _, value = c.partition("_")
    return {"exact": "exact: any stored bit changed",
            "abs": f"|ΔW| > {value}",
            "relrms": f"|ΔW| > {value}·RMS(W_base)",
            "bf16": f"bf16-η: |ΔW| > {value}·max(|W_base|, |W_post|)"}.get(kind, c)


def run_label(runs: pd.DataFrame) -> Callable[[str], str]:
    method = dict(zip(runs["run_id"], runs["method"]))
    status = dict(zip(runs["run_id"], runs["status"]))

    def fmt(run_id: str) -> str:
        m = method.get(run_id)
        label = run_id if not m or m == run_id else f"{run_id} ({m})"
        return label if status.get(run_id) in ("done", None) else f"{label} · {status[run_id]}"
    return fmt


# ----------------------------------------------------------------------------------- sidebar
@st.cache_data(show_spinner=False, ttl=10, max_entries=16)
def _stores(store_roots: tuple[str, ...], env_db: str) -> list[str]:
    return roots.list_stores(list(store_roots))


def store_choice() -> tuple[list[str], str, bool]:
    """(stores the browser may choose, the one to open first, whether the URL named another).

    The operator's ``$OPDVIZ_DB`` comes first; a ``db`` URL parameter must name one of the listed stores,
    compared as text (``roots.choose_store``): nothing it names is created, opened or looked up."""
    store_roots = roots.store_roots()
    stores = _stores(tuple(map(str, store_roots)), roots.default_db())
    want = st.query_params.get("db")
    if not want:
        return stores, stores[0], False
    try:
        return stores, roots.choose_store(want, stores), False
    except roots.StoreRefused:
        return stores, stores[0], True


def sidebar(page_path: str) -> None:
    """Draw the shared filters in the sidebar and keep the URL in step; ``page_path`` is the current
    page's url path (its own query params are kept, other pages' are dropped)."""
    qp = st.query_params
    sb = st.sidebar
    stores, first, refused = store_choice()
    env_db = stores[0]
    if "f_db" not in st.session_state:
        st.session_state.f_db = first
        if refused:
            st.session_state["_db_refused"] = True
    if st.session_state.f_db not in stores:
        st.session_state.f_db = env_db
    store_roots = roots.store_roots()
    db = sb.selectbox("Database", stores, key="f_db", format_func=lambda s: roots.label(s, store_roots),
                      help="The opdviz stores on this server: $OPDVIZ_DB first, then the `.duckdb` stores "
                           "under the folders the operator offers (OPDVIZ_STORE_ROOTS).")
    if st.session_state.pop("_db_refused", False):
        sb.error(roots.REFUSED, icon=":material/block:")
        sync_params({"db": None})
    st.session_state[_STATE] = {"db": db, "ready": False}
    store = Store(db)
    if not store.exists():
        return
    st_ = stamp(db)
    try:
        runs = _cached("runs", db, st_, ())
        facets = _cached("facets", db, st_, ())
        criteria = _cached("criteria", db, st_, ())
    except OpdvizError as exc:
        st.session_state[_STATE] = {"db": db, "ready": False, "error": str(exc)}
        return
    if runs.empty:
        return

    run_ids = list(runs["run_id"])
    _init("f_runs", _param_list("run"))
    st.session_state.f_runs = [r for r in st.session_state.f_runs if r in run_ids]
    # trajectory steps (runs NAME@step) belong on the Trajectory page; "all runs" means the others
    kinds = runs["kind"] if "kind" in runs else pd.Series(["pair"] * len(runs))
    primary = [r for r, k in zip(run_ids, kinds) if k != "trajectory"]
    hides_steps = 0 < len(primary) < len(run_ids)
    chosen = sb.multiselect("Runs", run_ids, key="f_runs", format_func=run_label(runs),
                            placeholder="all runs (trajectory steps hidden)" if hides_steps else "all runs",
                            help="Post-trained checkpoints (label: run id and method). Empty = all runs except "
                                 "the steps of trajectories, which you can pick here or see on the Trajectory page.")
    effective = list(chosen) or (primary if hides_steps else [])
    fac = facets[facets["run_id"].isin(effective)] if effective else facets

    towers = sorted(fac["tower"].dropna().unique())
    _init("f_towers", _param_list("tower"))
    st.session_state.f_towers = [t for t in st.session_state.f_towers if t in towers]
    if len(towers) > 1:
        sb.multiselect("Tower", towers, key="f_towers", placeholder="all towers",
                       help="Text decoder or vision encoder (VLMs).")
    sel_towers = tuple(st.session_state.f_towers) if len(towers) > 1 else ()
    if sel_towers:
        fac = fac[fac["tower"].isin(sel_towers)]

    layers = fac["layer"].dropna().astype(int)
    lo, hi = (int(layers.min()), int(layers.max())) if len(layers) else (0, 0)
    layer_range = None
    if hi > lo:
        want = _parse_range(qp.get("layers"), lo, hi)
        _init("f_layers", want)
        a, b = st.session_state.f_layers
        st.session_state.f_layers = (min(max(a, lo), hi), max(min(b, hi), lo))
        layer_range = sb.slider("Layers", lo, hi, key="f_layers",
                                help="Decoder layer range. Tensors without a layer (embedding, head, final "
                                     "norm) are always kept.")
        if tuple(layer_range) == (lo, hi):
            layer_range = None

    blocks = sorted(fac["block"].dropna().unique())
    _init("f_blocks", _param_list("block"))
    st.session_state.f_blocks = [b for b in st.session_state.f_blocks if b in blocks]
    sel_blocks = sb.multiselect("Block", blocks, key="f_blocks", placeholder="all blocks",
                                help="attn = attention projections, ffn = MLP, embed/head/norm.")
    if sel_blocks:
        fac = fac[fac["block"].isin(sel_blocks)]

    from opdviz.views.style import module_sort_key  # the figures' module order (q k v o gate up down …)
    modules = sorted(fac["module"].dropna().unique(), key=module_sort_key)
    _init("f_modules", _param_list("module"))
    st.session_state.f_modules = [m for m in st.session_state.f_modules if m in modules]
    sel_modules = sb.multiselect("Module", modules, key="f_modules", placeholder="all modules")

    _init("f_crit", qp.get("crit") or DEFAULT_CRITERION)
    if st.session_state.f_crit not in criteria:
        st.session_state.f_crit = DEFAULT_CRITERION if DEFAULT_CRITERION in criteria else criteria[0]
    crit = sb.selectbox("“Changed” means", criteria, key="f_crit", format_func=criterion_label,
                        help="When a coordinate counts as updated (every criterion is stored; sparsity = "
                             "unchanged / numel). Default |ΔW| > 1e-5 (2606.13657, 2505.11711); exact = "
                             "bitwise; RMS-relative τ; bf16-η = 1e-3 of the larger magnitude (2511.08567).")

    sel = Selection(runs=tuple(effective), towers=sel_towers, blocks=tuple(sel_blocks), modules=tuple(sel_modules),
                    layer_min=layer_range[0] if layer_range else None,
                    layer_max=layer_range[1] if layer_range else None)
    st.session_state[_STATE] = {"db": db, "ready": True, "stamp": st_, "sel": sel,
                                "ctx": ViewContext(criterion=crit), "runs": runs}
    own = PAGE_PARAMS.get(page_path, ())
    sync_params({"db": None if db == env_db else db, "run": chosen, "tower": sel_towers, "block": sel_blocks,
                 "module": sel_modules, "layers": f"{layer_range[0]}-{layer_range[1]}" if layer_range else None,
                 "crit": None if crit == DEFAULT_CRITERION else crit,
                 **{k: None for keys in PAGE_PARAMS.values() for k in keys if k not in own}})
    sb.caption(f"{len(run_ids)} run(s) in {code(Path(db).name)}. The URL keeps this selection — bookmark or "
               "share it.")


def _parse_range(text: str | None, lo: int, hi: int) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in (text or "").split("-", 1))
        return (min(a, b), max(a, b))
    except ValueError:
        return (lo, hi)


# ----------------------------------------------------------------------------------- page helpers
def begin(title: str, intro: str) -> View:
    """Title, explanation and status notices; returns the current View or stops with the empty state."""
    route_through_app()
    st.title(title)
    st.markdown(intro)
    shared = st.session_state.get(_STATE) or {"db": DEFAULT_DB, "ready": False}
    if shared.get("error"):
        st.error(md(shared["error"]))
        st.stop()
    if not shared["ready"]:
        db = shared["db"]
        what = "has no runs yet" if Store(db).exists() else "does not exist"
        st.info(f"The database {code(db)} {what}.\n\n" + HOW_TO_GET_DATA.format(
            compute=code(f"opdviz compute BASE POST --method OPD --db {db}")), icon=":material/info:")
        if Path(__file__).with_name("new_analysis.py").exists():
            st.page_link("pages/new_analysis.py", label="New analysis", icon=":material/add_circle:")
        st.stop()
    view = View(shared["db"], shared["stamp"], shared["sel"], shared["ctx"])
    _run_notices(view, shared["runs"])
    return view


def route_through_app() -> None:
    """Make sure app.py (navigation + sidebar) ran: rerun through it if Streamlit ran this page directly.
    ``begin()`` calls it; a page that does not use ``begin()`` should call it first thing.

    Streamlit keeps a process-wide flag that is True while a ``pages/`` folder exists and no
    ``st.navigation`` call has been seen yet; in that state it runs ``pages/<name>.py`` by itself for a
    deep link (e.g. the first request to a fresh server is a bookmarked ``/sparsity``), skipping app.py.
    Clearing the flag and rerunning sends the request through app.py's ``st.navigation``.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        st.rerun()


def _run_notices(view: View, runs: pd.DataFrame) -> None:
    shown = runs[runs["run_id"].isin(view.sel.runs)] if view.sel.runs else runs
    for row in shown.itertuples():
        if row.status == "running":
            n_total = int(row.n_tensors or 0)
            n_done, current = _progress(view, row.run_id)
            frac = min(1.0, n_done / n_total) if n_total else 0.0
            st.info(f"Run **{md(row.run_id)}** is still computing: {n_done} of {n_total} tensors done. The figures "
                    "show the tensors finished so far; refresh to pick up new results."
                    + (f" Now on {code(current)}." if current else ""), icon=":material/hourglass_top:")
            bar, button = st.columns([5, 1], vertical_alignment="center")
            bar.progress(frac, text=f"{md(row.run_id)}: {n_done}/{n_total} tensors")
            button.button("Refresh", key=f"refresh_{row.run_id}", icon=":material/refresh:")
        elif row.status not in ("done", None):
            st.warning(f"Run **{md(row.run_id)}** is {code(row.status)}" + (f": {md(row.error)}" if row.error else "") +
                       ". Its finished tensors are shown; rerun the same `opdviz compute` command (or Resume on "
                       "the New analysis page) to compute the rest.", icon=":material/warning:")


def _progress(view: View, run_id: str) -> tuple[int, str]:
    """Tensors done so far: the job's progress file when present (fresh every tensor), else a count."""
    path = Path(view.db + ".staging") / "progress" / f"{slug(run_id)}.json"
    try:
        state = json.loads(path.read_text())
        return int(state.get("n_done", 0)), str(state.get("current") or "")
    except (OSError, ValueError):
        return query("n_top_done", view.db, view.stamp, run_id), ""


def with_ctx(view: View, **changes) -> View:
    return dataclasses.replace(view, ctx=dataclasses.replace(view.ctx, **changes))


def sticky(key: str, param: str, options: list, default, multi: bool = False):
    """Seed a page widget from the URL (first visit) or its last value on this page; keep it valid."""
    mem = f"_sticky_{key}"
    if key not in st.session_state:
        from_url = _param_list(param) if multi else st.query_params.get(param)
        st.session_state[key] = from_url or st.session_state.get(mem, default)
    value = st.session_state[key]
    if multi:
        st.session_state[key] = [v for v in value if v in options]
    elif value not in options:
        st.session_state[key] = default
    return st.session_state[key]


def remember(key: str, value) -> None:
    st.session_state[f"_sticky_{key}"] = value


def figures(view: View, page: str) -> None:
    """Every FigureSpec of ``page``: figure (full width), caption, export row; one zip for the page.

    Figures are built on a small thread pool (DuckDB and pandas release the GIL) and drawn in order as
    they arrive; afterwards the other pages' figures for this selection are warmed in the background.
    """
    specs = registry.figures_for(page)
    approx_notice(view)
    zip_slot = st.container()
    built = []
    for i, (spec, future) in enumerate(zip(specs, _submit(view, specs))):
        try:
            fig, df = future.result()
        except OpdvizError as exc:
            st.error(md(exc))
            st.stop()
        built.append((spec.key, fig, df))
        if i:
            st.divider()
        st.plotly_chart(fig, width="stretch", theme=None, key=f"fig_{spec.key}",
                        config={"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}})
        if spec.caption:
            st.caption(spec.caption)
        export_row(spec.key, fig, df, manifest=lambda: provenance_manifest(view))
    if built:
        zip_slot.download_button(":material/folder_zip: Download this page as a zip (paper-sized PDFs + data + "
                                 "manifest)",
                                 data=lambda: figexport.page_zip(built, fmt="pdf", width="single",
                                                                 manifest=provenance_manifest(view)),
                                 file_name=f"opdviz_{page}.zip", mime="application/zip", on_click="ignore",
                                 key=f"zip_{page}")
    _warmer().warm(view, exclude=page)


def _submit(view: View, specs) -> list[Future]:
    ctx = get_script_run_ctx()
    return [_warmer().submit((view.db, view.stamp, spec.key, view.sel, view.ctx), ctx) for spec in specs]


def _in_ctx(ctx, fn, *args):
    """Run ``fn`` on a worker thread tagged with the session's script context (quiet cache calls)."""
    if ctx is not None:
        add_script_run_ctx(threading.current_thread(), ctx)
    return fn(*args)


class Warmer:
    """One per server process: builds figures on a small thread pool, never the same one twice at once
    (a page and the background warmer share in-flight builds), and warms, one figure at a time, every
    page's default view for the newest selection a user looked at. Older warm requests are dropped."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="opdviz-fig")
        self._lock = threading.RLock()    # a done future runs its callback (_forget) inside submit()
        self._inflight: dict[tuple, Future] = {}
        self._wanted: tuple | None = None
        self._next: tuple[View, str] | None = None
        self._thread: threading.Thread | None = None

    def submit(self, key: tuple, ctx=None) -> Future:
        """The (figure, data) of ``key`` = (db, stamp, figure key, Selection, ViewContext), as a Future."""
        with self._lock:
            fut = self._inflight.get(key)
            if fut is None:
                db, stamp_, fig_key, sel, vctx = key
                fut = self.pool.submit(_in_ctx, ctx, _cached, "figure", db, stamp_, (fig_key, sel, vctx))
                self._inflight[key] = fut
                fut.add_done_callback(lambda _f, k=key: self._forget(k))
        return fut

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
            tensor = _cached("largest_tensor", view.db, view.stamp, (view.sel,))
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
def _warmer() -> Warmer:
    return Warmer()


def provenance_manifest(view: View, ctx=None) -> dict:
    """The export manifest (store, runs with paths and fingerprints, options, filters, version, date) of
    what ``view`` shows; ``ctx`` replaces the view's context (Overlap/Trajectory page choices)."""
    return figexport.manifest(view.store, view.sel, ctx if ctx is not None else view.ctx)


def export_row(key: str, fig, df: pd.DataFrame, manifest: Callable[[], dict] | None = None) -> None:
    """Download buttons; the bytes are made only when a button is clicked (callable ``data``). With
    ``manifest`` (a callable giving ``figexport.manifest``), a ZIP button bundles the figure (PDF and PNG),
    its data (CSV) and manifest.json — the download that says where its numbers came from."""
    row = st.container(horizontal=True, vertical_alignment="center", gap="small")
    row.caption("Figure", width="content")
    for fmt in ("png", "svg", "pdf", "html"):
        row.download_button(fmt.upper(), data=_lazy(figexport.figure_bytes, fig, fmt), file_name=f"{key}.{fmt}",
                            mime=FORMATS[fmt], on_click="ignore", key=f"dl_{key}_{fmt}", type="secondary")
    row.caption("· Data", width="content")
    for fmt, label in (("csv", "CSV"), ("parquet", "Parquet")):
        row.download_button(label, data=_lazy(figexport.data_bytes, df, fmt), file_name=f"{key}.{fmt}",
                            mime=FORMATS[fmt], on_click="ignore", key=f"dl_{key}_{fmt}", type="secondary",
                            disabled=df is None or df.empty)
    if manifest is not None:
        row.caption("· With provenance", width="content")
        row.download_button("ZIP", data=lambda: _figure_zip(key, fig, df, manifest()), file_name=f"{key}.zip",
                            mime="application/zip", on_click="ignore", key=f"dl_{key}_zip", type="secondary",
                            help="The figure as PDF and PNG, its data as CSV, and manifest.json (store, runs, "
                                 "checkpoint paths and fingerprints, options, filters, version, date).")


def _figure_zip(key: str, fig, df: pd.DataFrame, manifest: dict) -> bytes:
    import io
    import zipfile

    pdf = figexport.page_zip([(key, fig, df)], fmt="pdf", manifest=manifest)
    buf = io.BytesIO(pdf)
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr(f"{key.replace('.', '-')}.png", figexport.figure_bytes(fig, "png"))
    return buf.getvalue()


def _lazy(fn: Callable, *args) -> Callable[[], bytes]:
    return lambda: fn(*args)


def provenance_rows(prov: dict, keys: Iterable[str]) -> pd.DataFrame:
    """Two-column (field, value) table of the provenance ``keys`` that are set, byte counts humanised."""
    rows = []
    for k in keys:
        v = prov.get(k)
        if v is None or v == "":
            continue
        if k.endswith("_bytes") and isinstance(v, (int, float)):
            v = _human_bytes(v)
        elif k == "wall_s" and isinstance(v, (int, float)):
            v = f"{v:.1f} s"
        rows.append({"field": k, "value": str(v)})
    return pd.DataFrame(rows, columns=["field", "value"]).set_index("field")


_human_bytes = formatting.human_bytes     # one byte formatter (opdviz.views.formatting)


def compare_metrics(names: list[str]) -> list[str]:
    """The Compare page's metric choices: group columns first, then the stored per-matrix scalars
    (sparsity_* come through the sidebar criterion instead; bookkeeping scalars are left out)."""
    head = [m for m in GROUP_COLUMNS if m not in ("changed", "numel")]
    skip = re.compile(r"^(sparsity_|spectrum_exact$|(base|post|delta)_(sq_sum|fro)$|base_rms$)")
    return head + [m for m in names if not skip.match(m) and m not in head]


def percent(df: pd.DataFrame, prefixes: tuple[str, ...]) -> pd.DataFrame:
    """A copy with the fraction columns starting with ``prefixes`` scaled to percent (for display)."""
    out = df.copy()
    for c in out.columns:
        if c.startswith(prefixes):
            out[c] = 100 * out[c].astype(float)
    return out


def numbers_table(df: pd.DataFrame, labels: dict[str, str] | None = None, **config) -> None:
    """``df`` as a table whose every number is scaled and formatted by its unit in the metric catalog
    (``opdviz.views.formatting``: fractions in %, ratios plain, angles in degrees); ``labels`` rename headers,
    ``config`` adds or overrides Streamlit column configs (text columns)."""
    from opdviz.views import formatting

    cols = {c: st.column_config.NumberColumn(head, format=fmt)
            for c, (head, fmt) in formatting.column_formats(df, labels).items()}
    cols.update({c: v for c, v in config.items()})
    st.dataframe(formatting.display(df), hide_index=True, width="stretch", column_config=cols)


def approx_notice(view: View) -> None:
    """Say so when some selected matrices have approximate spectra: their spectral and geometry numbers
    (figures, tables, exports) are approximate. Exports say it too (manifest.json, README.txt)."""
    counts = query("approx_counts", view.db, view.stamp, view.sel)
    if counts:
        runs = ", ".join(f"**{r}** ({n})" for r, n in counts.items())
        st.info(f"≈ Approximate values: some matrices' spectra came from the randomized top-k solver — {runs} "
                "matrices. Their spectra, ranks, energies, projections, angles and principal coverage are "
                "approximate (errors measured in the README, *Exact and approximate spectra*); recompute with "
                "`--spectrum exact` (or on a GPU) for exact values.", icon=":material/info:")


def chart(i: int, key: str, fig, df: pd.DataFrame, caption: str, manifest: Callable[[], dict] | None = None) -> None:
    """One figure of a page: a divider before all but the first, the chart, its caption and export row."""
    if i:
        st.divider()
    st.plotly_chart(fig, width="stretch", theme=None, key=f"fig_{key}",
                    config={"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}})
    st.caption(caption)
    export_row(key, fig, df, manifest=manifest)
