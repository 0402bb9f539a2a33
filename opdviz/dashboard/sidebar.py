"""The shared sidebar: the store choice (among the operator's stores) and the filters every page reads.

``app.py`` calls ``sidebar()`` on every rerun; it leaves the chosen store, the ``Selection`` and the
``ViewContext`` in ``st.session_state`` for the page (``shared()``; ``header.begin`` reads them).

The *Database* is chosen from a list of the stores under the operator's store roots (``opdviz.io.roots``:
``OPDVIZ_STORE_ROOTS``, default the folder of ``$OPDVIZ_DB`` and ``data/``); a ``db`` URL parameter naming
anything else gets one message (``roots.REFUSED``) and the operator's store, and no file is looked up.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import streamlit as st

from opdviz import options
from opdviz.errors import OpdvizError
from opdviz.io import roots
from opdviz.store import Store
from opdviz.store import Selection
from opdviz.views.figures import module_sort_key  # the figures' module order (q k v o gate up down …)
from opdviz.views.compare import GROUP_COLUMNS
from opdviz.views.context import ViewContext

from opdviz.dashboard.cache import cached, stamp
from opdviz.dashboard.params import PAGE_PARAMS, init_state, param_list, parse_range, sync_params
from opdviz.dashboard.text import code

DEFAULT_CRITERION = ViewContext().criterion
_STATE = "_opdviz_shared"


def shared() -> dict:
    """What the sidebar left for the page this rerun: ``db``, ``ready`` and, when ready, ``stamp``, ``sel``,
    ``ctx``, ``runs``; or ``error``. Empty when the sidebar has not run in this session."""
    return st.session_state.get(_STATE) or {}


def chosen_db() -> str:
    """The store chosen in the sidebar (the operator's ``$OPDVIZ_DB`` before the sidebar ran)."""
    return shared().get("db") or roots.default_db()


def criterion_label(c: str) -> str:
    """Human label of a stored criterion name (``abs_1e-5`` → ``|ΔW| > 1e-5``)."""
    return options.criterion_label(c, "long")


def run_label(runs: pd.DataFrame) -> Callable[[str], str]:
    """The run chooser's label: run id, method when it differs, and the status unless done."""
    method = dict(zip(runs["run_id"], runs["method"]))
    status = dict(zip(runs["run_id"], runs["status"]))

    def fmt(run_id: str) -> str:
        m = method.get(run_id)
        label = run_id if not m or m == run_id else f"{run_id} ({m})"
        return label if status.get(run_id) in ("done", None) else f"{label} · {status[run_id]}"
    return fmt


def compare_metrics(names: list[str]) -> list[str]:
    """The Compare page's metric choices: group columns first, then the stored per-matrix scalars
    (sparsity_* come through the sidebar criterion instead; bookkeeping scalars are left out)."""
    head = [m for m in GROUP_COLUMNS if m not in ("changed", "numel")]
    skip = re.compile(r"^(sparsity_|spectrum_exact$|(base|post|delta)_(sq_sum|fro)$|base_rms$)")
    return head + [m for m in names if not skip.match(m) and m not in head]


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
        runs = cached("runs", db, st_, ())
        facets = cached("facets", db, st_, ())
        criteria = cached("criteria", db, st_, ())
    except OpdvizError as exc:
        st.session_state[_STATE] = {"db": db, "ready": False, "error": str(exc)}
        return
    if runs.empty:
        return

    run_ids = list(runs["run_id"])
    init_state("f_runs", param_list("run"))
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
    init_state("f_towers", param_list("tower"))
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
        want = parse_range(qp.get("layers"), lo, hi)
        init_state("f_layers", want)
        a, b = st.session_state.f_layers
        st.session_state.f_layers = (min(max(a, lo), hi), max(min(b, hi), lo))
        layer_range = sb.slider("Layers", lo, hi, key="f_layers",
                                help="Decoder layer range. Tensors without a layer (embedding, head, final "
                                     "norm) are always kept.")
        if tuple(layer_range) == (lo, hi):
            layer_range = None

    blocks = sorted(fac["block"].dropna().unique())
    init_state("f_blocks", param_list("block"))
    st.session_state.f_blocks = [b for b in st.session_state.f_blocks if b in blocks]
    sel_blocks = sb.multiselect("Block", blocks, key="f_blocks", placeholder="all blocks",
                                help="attn = attention projections, ffn = MLP, embed/head/norm.")
    if sel_blocks:
        fac = fac[fac["block"].isin(sel_blocks)]

    modules = sorted(fac["module"].dropna().unique(), key=module_sort_key)
    init_state("f_modules", param_list("module"))
    st.session_state.f_modules = [m for m in st.session_state.f_modules if m in modules]
    sel_modules = sb.multiselect("Module", modules, key="f_modules", placeholder="all modules")

    init_state("f_crit", qp.get("crit") or DEFAULT_CRITERION)
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
