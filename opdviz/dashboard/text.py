"""Untrusted text (run names, method labels, metric keys, paths, messages) shown literally in Streamlit.

Text from the store, a checkpoint or the browser goes into Markdown only through ``md()`` (escaped) or
``code()`` (an inline code span), so nothing in it renders as emphasis, links, HTML, math or emoji.
"""

from __future__ import annotations

import re
import unicodedata

import pandas as pd

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
