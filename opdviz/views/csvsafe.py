"""CSV that is safe to open in a spreadsheet: every CSV opdviz writes goes through ``to_csv`` here.

Run names, method labels, tensor names and trainer metric keys are untrusted text. A spreadsheet treats
a cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return as a formula, so such a text
cell (and column name) gets a leading single quote, as OWASP's "CSV injection" advice says; the quote
shows the text literally. Numeric columns are left alone (``-0.5`` stays a number), and so is a text cell
that is just a plain number (``-1e-5``): spreadsheets read those as numbers, never as formulas.
"""

from __future__ import annotations

import re

import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")


def neutralise(value):
    """``value`` with a leading ``'`` when it is text a spreadsheet would run as a formula; else unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _PLAIN_NUMBER.match(value):
        return "'" + value
    return value


def csv_safe(df: pd.DataFrame) -> pd.DataFrame:
    """A shallow copy of ``df`` whose text cells and column names are neutralised (numbers untouched)."""
    out = df.copy(deep=False)
    for i, (_, col) in enumerate(out.items()):
        if pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype) \
                or pd.api.types.is_datetime64_any_dtype(col.dtype):
            continue
        if isinstance(col.dtype, pd.CategoricalDtype):
            col = col.astype(object)
        try:
            first = col.str[:1]                  # vectorised; NaN for cells that are not text
        except AttributeError:                   # no text at all (lists, mixed objects)
            first = col.map(lambda v: v[:1] if isinstance(v, str) else "")
        risky = first.isin(FORMULA_STARTS).to_numpy(dtype=bool, na_value=False)
        if risky.any():
            col = col.astype(object).copy()
            col[risky] = [neutralise(v) for v in col[risky]]
            out.isetitem(i, col)
    out.columns = [neutralise(c) for c in out.columns]
    return out


def to_csv(df: pd.DataFrame, target=None) -> str | None:
    """``df`` as CSV (no index) after ``csv_safe``; written to ``target`` (path or text stream), or returned."""
    return csv_safe(df).to_csv(target, index=False)
