"""The dashboard's page list, and the guard that sends every request through ``app.py``.

``app.py`` hands ``pages()`` to ``st.navigation`` and runs the chosen page with ``run()``;
``route_through_app()`` (called by ``header.begin`` and by pages that do not use it) makes sure that
happened in this script run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

_ROUTED = "_opdviz_routed"
# an emoji favicon is drawn locally (a data: URL); a :material/…: one (a page's icon, when no page_icon is
# set before st.navigation) is fetched from fonts.gstatic.com
PAGE_CONFIG = {"page_title": "opdviz", "page_icon": "📊", "layout": "wide"}


def pages() -> dict[str, list[st.Page]]:
    """The pages by section, for ``st.navigation`` (paths relative to ``app.py``)."""
    return {
        "Explore": [
            st.Page("pages/overview.py", title="Overview", icon=":material/dashboard:", default=True),
            st.Page("pages/sparsity.py", title="Sparsity", icon=":material/grain:"),
            st.Page("pages/spectra.py", title="Spectra", icon=":material/ssid_chart:"),
            st.Page("pages/geometry.py", title="Geometry", icon=":material/architecture:"),
            st.Page("pages/tensor.py", title="Tensor", icon=":material/grid_on:"),
        ],
        "Across runs": [
            st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
            st.Page("pages/overlap.py", title="Overlap", icon=":material/join_inner:"),
            st.Page("pages/trajectory.py", title="Trajectory", icon=":material/timeline:"),
            st.Page("pages/lab.py", title="Lab sweep", icon=":material/science:"),
        ],
        "Compute": [
            st.Page("pages/new_analysis.py", title="New analysis", icon=":material/add_circle:"),
        ],
    }


def run(page: st.Page) -> None:
    """Run the page chosen by ``st.navigation``, marked as routed through app.py (for this run only)."""
    st.session_state[_ROUTED] = True
    page.run()


def route_through_app() -> None:
    """Make sure app.py (navigation + sidebar) ran: rerun through it if Streamlit ran this page directly.

    While a ``pages/`` folder exists next to app.py and no ``st.navigation`` call has been seen yet in the
    server process, Streamlit runs ``pages/<name>.py`` by itself for a deep link (e.g. the first request to
    a fresh server is a bookmarked ``/sparsity``), skipping app.py: then ``run()`` has not marked this
    script run. Calling ``st.navigation`` with app.py's pages ends that mode (and keeps this page as the
    one to show); the rerun then goes through app.py. A page run as the main script itself
    (``streamlit run pages/x.py``, a test) has no app.py to go through and is left alone.
    """
    if not st.session_state.pop(_ROUTED, False) and _main_script_has_pages():
        st.set_page_config(**PAGE_CONFIG)
        st.navigation(pages())
        st.rerun()


def _main_script_has_pages() -> bool:
    """Whether the script Streamlit runs as ``__main__`` has a ``pages/`` folder beside it (the condition
    under which Streamlit runs a page by itself, and under which app.py's pages resolve)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return bool(main) and (Path(main).resolve().parent / "pages").is_dir()
