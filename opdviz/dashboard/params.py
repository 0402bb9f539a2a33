"""Widget state ↔ URL query params, so that a view can be bookmarked and shared.

Query-param keys: ``db``, ``run`` (repeated), ``tower``, ``block``, ``module`` (repeated), ``layers``
(``LO-HI``), ``crit``, and per page ``tensor`` (Tensor), ``tensors`` (Spectra and Geometry, repeated),
``metric``, ``a``, ``b`` (Compare), ``pair`` (Overlap), ``traj``, ``tmetric`` (Trajectory). Defaults are
left out of the URL; a page's keys leave it when another page opens.
"""

from __future__ import annotations

from collections.abc import Iterable

import streamlit as st

PAGE_PARAMS = {"tensor": ("tensor",), "spectra": ("tensors",), "geometry": ("tensors",),
               "compare": ("metric", "a", "b"), "overlap": ("pair",), "trajectory": ("traj", "tmetric")}


def param_list(key: str) -> list[str]:
    """The non-empty values of a (repeatable) query param."""
    return [v for v in st.query_params.get_all(key) if v != ""]


def sync_params(values: dict[str, str | Iterable[str] | None]) -> None:
    """Write ``values`` into the URL (None/empty removes the key); untouched keys stay as they are."""
    for key, value in values.items():
        want = [] if value is None else [value] if isinstance(value, str) else [str(v) for v in value]
        if want == param_list(key):
            continue
        if want:
            st.query_params[key] = want if len(want) > 1 else want[0]
        elif key in st.query_params:
            del st.query_params[key]


def init_state(key: str, value) -> None:
    """Seed a widget's state once (first load of the session: from the URL)."""
    if key not in st.session_state:
        st.session_state[key] = value


def parse_range(text: str | None, lo: int, hi: int) -> tuple[int, int]:
    """``"A-B"`` as an ordered pair of ints; ``(lo, hi)`` when it does not parse."""
    try:
        a, b = (int(x) for x in (text or "").split("-", 1))
        return (min(a, b), max(a, b))
    except ValueError:
        return (lo, hi)


def sticky(key: str, param: str, options: list, default, multi: bool = False):
    """Seed a page widget from the URL (first visit) or its last value on this page; keep it valid."""
    mem = f"_sticky_{key}"
    if key not in st.session_state:
        from_url = param_list(param) if multi else st.query_params.get(param)
        st.session_state[key] = from_url or st.session_state.get(mem, default)
    value = st.session_state[key]
    if multi:
        st.session_state[key] = [v for v in value if v in options]
    elif value not in options:
        st.session_state[key] = default
    return st.session_state[key]


def remember(key: str, value) -> None:
    """Keep a page widget's value for the next visit of the page (``sticky`` reads it)."""
    st.session_state[f"_sticky_{key}"] = value
