"""``QueryMemo``: a bounded, thread-safe memo of query results that a ``Store`` reads through."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import pandas as pd


def _frame_bytes(df: pd.DataFrame) -> int:
    """Approximate memory of a query result, list columns (numpy arrays per row) included: each column's
    buffer (a pointer per row for object columns, plus what each row's object holds). Read off the column
    arrays directly; ``DataFrame.memory_usage`` costs as much as a small query's own conversion."""
    size = 0
    for i in range(df.shape[1]):            # by position: a result may repeat a column name
        column = df.iloc[:, i]
        arr = column.array
        if column.dtype == object:
            size += 8 * len(arr) + sum(getattr(v, "nbytes", 64) for v in arr)
        else:
            size += arr.nbytes
    return size


class QueryMemo:
    """A bounded, thread-safe memo of query results keyed by (store, version, sql, params).

    Concurrent callers of the same key wait for the first one instead of running the query again (the
    dashboard builds a page's figures in parallel, and several read the same rows). Results are returned
    as shallow copies (pandas copy-on-write keeps the stored frame intact)."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._data: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._pending: dict = {}
        self.bytes = 0

    def get(self, key, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        while True:
            with self._lock:
                if key in self._data:
                    self._data.move_to_end(key)
                    return self._data[key].copy(deep=False)
                event = self._pending.get(key)
                if event is None:
                    event = self._pending[key] = threading.Event()
                    owner = True
                else:
                    owner = False
            if not owner:
                event.wait()
                continue            # the owner stored it (or failed: then this caller runs it itself)
            try:
                df = compute()
                self._put(key, df)
                return df.copy(deep=False)
            finally:
                with self._lock:
                    self._pending.pop(key, None)
                event.set()

    def _put(self, key, df: pd.DataFrame) -> None:
        size = _frame_bytes(df)
        if size > self.max_bytes:
            return
        with self._lock:
            self._data[key] = df
            self._sizes[key] = size
            self.bytes += size
            while self.bytes > self.max_bytes and self._data:
                old, _ = self._data.popitem(last=False)
                self.bytes -= self._sizes.pop(old)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()
            self.bytes = 0
