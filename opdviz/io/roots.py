"""Operator-offered roots: which stores (and folders) a browser may reach, checked before any file is touched.

The operator (who starts the server and sets ``OPDVIZ_*``) is trusted; a browser is not. From the
browser a store is *chosen from a list* of the stores found under the store roots, never typed:

* ``store_roots()`` — ``OPDVIZ_STORE_ROOTS`` (``os.pathsep``-separated); default: the folder of
  ``$OPDVIZ_DB`` (else of ``data/opdviz.duckdb``) and the project's ``data/``.
* ``list_stores()`` — the ``*.duckdb`` files (and stores that so far only have a ``*.duckdb.staging``
  folder) under those roots, bounded in depth and count, symlinks leading out left out; the
  operator's ``$OPDVIZ_DB`` is always first in the list.
* ``choose_store(value)`` — the store a URL parameter names, or ``StoreRefused`` with one message
  (``REFUSED``) whatever the reason, so a refusal never tells whether a path exists.

``lexically_under(path, roots)`` is the first gate for any path from the browser: pure string work
(``os.path.abspath`` / ``normpath``, no filesystem call on the path), so a path outside the roots is
refused before anything is created, opened or stat-ed; only a path already inside is then resolved
(``realpath``) and checked again, which catches symlinks inside a root that lead out of it.

    roots = store_roots()
    stores = list_stores(roots)
    db = choose_store(st.query_params["db"], stores)   # or StoreRefused
"""

from __future__ import annotations

import os
import stat
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from opdviz.errors import OpdvizError

REPO = Path(__file__).resolve().parents[2]          # the repository (this file is opdviz/io/...)
DB_ENV = "OPDVIZ_DB"
STORE_ROOTS_ENV = "OPDVIZ_STORE_ROOTS"
DEFAULT_DB = "data/opdviz.duckdb"
MAX_DEPTH = 3          # folders below a root that are searched for stores
MAX_STORES = 200       # stores listed at most
MAX_VISITS = 5000      # folders visited at most per listing (a huge tree cannot stall a page)
STORE_SUFFIX = ".duckdb"
STAGING_SUFFIX = ".duckdb.staging"
REFUSED = ("That database is not one this server offers. Choose a store from the *Database* list in the "
           "sidebar; the operator decides which folders are listed (OPDVIZ_STORE_ROOTS).")


class StoreRefused(OpdvizError):
    """A store named by the browser that is not among the operator's stores (one message, always the same)."""

    def __init__(self, message: str = REFUSED):
        super().__init__(message)


def default_db() -> str:
    """The operator's store: ``$OPDVIZ_DB``, else ``data/opdviz.duckdb`` (relative to the working folder)."""
    return os.environ.get(DB_ENV) or DEFAULT_DB


def _clean(text: str) -> bool:
    return bool(text.strip()) and not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


def _abs(path: str | os.PathLike) -> str:
    """Absolute and normalised without touching the file system (``..`` is collapsed lexically)."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def store_roots() -> list[Path]:
    """The folders whose stores the browser may choose: ``OPDVIZ_STORE_ROOTS`` (``os.pathsep``-separated),
    default the folder of ``default_db()`` and the project's ``data/``. Absolute, lexically normalised."""
    raw = os.environ.get(STORE_ROOTS_ENV)
    if raw and raw.strip():
        entries = [os.path.expanduser(e) for e in raw.split(os.pathsep) if e.strip()]
    else:
        entries = [os.path.dirname(_abs(default_db())), str(REPO / "data")]
    roots: list[Path] = []
    for e in entries:
        p = Path(_abs(e))
        if p not in roots:
            roots.append(p)
    return roots


def lexically_under(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> Path | None:
    """``path`` made absolute and normalised by string operations only, if that lies under one of
    ``roots`` (also normalised lexically); else None. Control characters and empty text give None."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str) or not _clean(text):
        return None
    p = _abs(text)
    for r in roots:
        r = _abs(r)
        if p == r or p.startswith(r.rstrip(os.sep) + os.sep):
            return Path(p)
    return None


def confined(path: str | os.PathLike, roots: Sequence[str | os.PathLike]) -> Path | None:
    """``path`` if it lies under ``roots`` both lexically (checked first, without touching the file
    system) and once symlinks are resolved (each root resolved too); else None. Symlinks are resolved
    one at a time (``resolve_within``), so nothing outside the roots is ever stat-ed on the way."""
    real_roots = [os.path.realpath(r) for r in roots]     # the operator's roots may be symlinks themselves
    lexical = lexically_under(path, [*roots, *real_roots])
    if lexical is None:
        return None
    if resolve_within(lexical, [*roots, *real_roots], real_roots) is None:
        return None
    return lexical


def resolve_within(path: str | os.PathLike, roots: Sequence[str | os.PathLike],
                   real_roots: Sequence[str] | None = None, max_links: int = 40) -> str | None:
    """The real path of ``path`` (lexically under ``roots``), following symlinks one component at a time
    and giving up (None) as soon as a link points outside ``real_roots`` (the roots resolved): unlike
    ``os.path.realpath`` it never looks at anything outside. Missing trailing components are kept as
    written."""
    real_roots = [os.path.realpath(r) for r in roots] if real_roots is None else list(real_roots)
    p = _abs(path)
    start = None
    for r, real in [*((_abs(r), os.path.realpath(r)) for r in roots), *((r, r) for r in real_roots)]:
        if p == r or p.startswith(r.rstrip(os.sep) + os.sep):
            start = (real, os.path.relpath(p, r))
            break
    if start is None:
        return None
    current, rest = start
    pending = [c for c in rest.split(os.sep) if c not in ("", ".")]
    links = 0
    while pending:
        nxt = os.path.join(current, pending.pop(0))
        if lexically_under(nxt, real_roots) is None:
            return None
        try:
            is_link = stat.S_ISLNK(os.lstat(nxt).st_mode)
        except OSError:                       # missing: nothing further to resolve
            return os.path.join(nxt, *pending)
        if not is_link:
            current = nxt
            continue
        links += 1
        if links > max_links:
            return None
        target = os.readlink(nxt)
        full = os.path.normpath(os.path.join(current, target, *pending))
        for real in real_roots:
            if full == real or full.startswith(real.rstrip(os.sep) + os.sep):
                current, pending = real, [c for c in os.path.relpath(full, real).split(os.sep) if c not in ("", ".")]
                break
        else:
            return None
    return current


def _store_of(entry: os.DirEntry) -> str | None:
    name = entry.name
    if name.startswith("."):
        return None
    if name.endswith(STORE_SUFFIX):
        return entry.path
    if name.endswith(STAGING_SUFFIX):
        return entry.path[: -len(".staging")]
    return None


def list_stores(roots: Sequence[str | os.PathLike] | None = None, *, max_depth: int = MAX_DEPTH,
                max_stores: int = MAX_STORES) -> list[str]:
    """The stores a browser may choose: ``default_db()`` first, then every ``*.duckdb`` file (or a
    store that so far has only its ``*.duckdb.staging`` folder) under ``roots`` (default
    ``store_roots()``), at most ``max_depth`` folders deep and ``max_stores`` in all, sorted. Hidden
    folders and staging folders are not searched; symlinks are not followed into folders, and a
    symlinked store that resolves outside the roots is left out."""
    roots = [Path(_abs(r)) for r in (store_roots() if roots is None else roots)]
    found: list[str] = []
    visits = 0
    for top in roots:
        stack = [(str(top), 0)]
        while stack and visits < MAX_VISITS and len(found) < max_stores:
            folder, depth = stack.pop()
            visits += 1
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                store = _store_of(entry)
                if store is not None:
                    if entry.is_symlink() and confined(entry.path, roots) is None:
                        continue
                    if store not in found:
                        found.append(store)
                    continue
                if depth < max_depth and not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, depth + 1))
    listed = sorted(found)[:max_stores]
    env_db = _abs(default_db())
    return [env_db] + [s for s in listed if s != env_db]


def choose_store(value: str | None, stores: Sequence[str]) -> str:
    """The store named by ``value`` (a URL parameter), which must be one of ``stores`` (from
    ``list_stores``); compared as normalised text, so nothing is looked up on disk. Raises
    ``StoreRefused`` (always the same message) for anything else."""
    if not isinstance(value, str) or not _clean(value):
        raise StoreRefused()
    want = _abs(value)
    for s in stores:
        if _abs(s) == want:
            return s
    raise StoreRefused()


def label(store: str, roots: Sequence[str | os.PathLike] | None = None) -> str:
    """A short name for a listed store: ``<root folder>/<path below it>``, else the path itself."""
    for r in store_roots() if roots is None else roots:
        under = lexically_under(store, [r])
        if under is not None:
            return str(Path(Path(r).name) / under.relative_to(_abs(r)))
    return store
