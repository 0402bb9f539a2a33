"""Store roots: which stores a browser may choose, decided without touching anything outside the roots.

Every refusal is the same message (``roots.REFUSED``), whether or not the path exists; the file
system calls made while deciding are recorded, and none may name a path outside the roots.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pytest

from fsrecorder import Recorder
from opdviz.io import roots
from opdviz.io.roots import REFUSED, StoreRefused, choose_store, confined, lexically_under, list_stores


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A store root with stores (one nested, one with staging only, one deep, one hidden), and a folder
    outside it holding a foreign DuckDB file; ``OPDVIZ_DB`` is the root's main store."""
    root, outside = tmp_path / "stores", tmp_path / "outside"
    (root / "nested" / "deeper").mkdir(parents=True)
    outside.mkdir()
    for p in (root / "main.duckdb", root / "nested" / "b.duckdb", outside / "foreign.duckdb"):
        duckdb.connect(str(p)).close()
    (root / "staged.duckdb.staging" / "runs").mkdir(parents=True)
    (root / "nested" / "deeper" / "d" / "e").mkdir(parents=True)
    duckdb.connect(str(root / "nested" / "deeper" / "d" / "e" / "too-deep.duckdb")).close()
    (root / ".hidden").mkdir()
    duckdb.connect(str(root / ".hidden" / "h.duckdb")).close()
    (root / "notes.txt").write_text("not a store")
    monkeypatch.setenv("OPDVIZ_DB", str(root / "main.duckdb"))
    monkeypatch.setenv("OPDVIZ_STORE_ROOTS", str(root))
    return root, outside


def test_default_roots_are_the_folder_of_the_store_and_data(monkeypatch, tmp_path):
    monkeypatch.delenv("OPDVIZ_STORE_ROOTS", raising=False)
    monkeypatch.setenv("OPDVIZ_DB", str(tmp_path / "x" / "s.duckdb"))
    assert roots.store_roots() == [tmp_path / "x", roots.REPO / "data"]
    monkeypatch.setenv("OPDVIZ_STORE_ROOTS", os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b" / "..")]))
    assert roots.store_roots() == [tmp_path / "a", tmp_path]


def test_list_offers_the_operators_store_first_and_stores_under_the_roots(tree):
    root, outside = tree
    assert list_stores() == [str(root / "main.duckdb"), str(root / "nested" / "b.duckdb"),
                             str(root / "staged.duckdb")]            # too deep, hidden, outside: not listed


def test_the_operators_store_is_listed_wherever_it_is(tree, monkeypatch, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "op.duckdb"
    monkeypatch.setenv("OPDVIZ_DB", str(elsewhere))
    stores = list_stores()
    assert stores[0] == str(elsewhere) and choose_store(str(elsewhere), stores) == str(elsewhere)


def test_the_list_is_bounded(tree):
    root, _ = tree
    for i in range(30):
        (root / f"s{i:02d}.duckdb").write_bytes(b"")
    stores = list_stores(max_stores=10)
    assert len(stores) == 10 and stores[0] == str(root / "main.duckdb")   # the operator's store is one of them


def test_a_symlink_leading_out_is_not_listed_and_never_followed(tree, monkeypatch):
    root, outside = tree
    (root / "link.duckdb").symlink_to(outside / "foreign.duckdb")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "inside-link.duckdb").symlink_to(root / "main.duckdb")
    rec = Recorder(monkeypatch, outside)
    stores = list_stores()
    assert str(root / "link.duckdb") not in stores and str(root / "inside-link.duckdb") in stores
    assert not any("linkdir" in s for s in stores)
    assert not [c for c in rec.calls if c[0] != "readlink"]         # only the link itself was read, never its target
    with pytest.raises(StoreRefused):
        choose_store(str(root / "link.duckdb"), stores)


@pytest.mark.parametrize("value", [
    "{outside}/foreign.duckdb",                 # an existing foreign DuckDB file
    "{outside}/new.duckdb",                     # a path that does not exist (would be created)
    "{outside}/missing/folder/new.duckdb",
    "{root}/../outside/foreign.duckdb",         # '..' out of a root
    "{root}/not-there.duckdb",                  # inside a root but not a listed store
    "{root}/notes.txt",                         # inside a root, not a store
    "/etc/passwd",
    "",
    "   ",
    "{root}/main.duckdb\n",                     # control characters
    "{root}/main\x00.duckdb",
])
def test_any_other_value_gets_one_message_and_touches_nothing(tree, monkeypatch, value):
    root, outside = tree
    before = (outside / "foreign.duckdb").read_bytes()
    listing = sorted(p.name for p in outside.iterdir())
    stores = list_stores()
    rec = Recorder(monkeypatch, outside)
    with pytest.raises(StoreRefused) as err:
        choose_store(value.format(root=root, outside=outside), stores)
    assert str(err.value) == REFUSED                                  # the same words whether it exists or not
    assert rec.calls == []                                            # nothing outside the roots was stat-ed/opened
    assert sorted(p.name for p in outside.iterdir()) == listing       # nothing created
    assert (outside / "foreign.duckdb").read_bytes() == before


def test_a_listed_store_is_accepted_in_any_spelling(tree):
    root, _ = tree
    stores = list_stores()
    assert choose_store(str(root / "nested" / ".." / "nested" / "b.duckdb"), stores) == str(root / "nested" / "b.duckdb")


def test_lexical_check_is_string_work_only(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch, Path("/"))
    assert lexically_under(tmp_path / "a" / ".." / "b", [tmp_path]) == tmp_path / "b"
    assert lexically_under(str(tmp_path) + "-sibling/x", [tmp_path]) is None     # a prefix is not a parent
    assert lexically_under(tmp_path / ".." / "x", [tmp_path]) is None
    assert lexically_under("a\u202eb", [tmp_path]) is None
    assert rec.calls == []


def test_confined_resolves_only_what_is_inside(tmp_path, monkeypatch):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "out").symlink_to(outside, target_is_directory=True)
    assert confined(root / "out" / "x", [root]) is None               # inside lexically, outside once resolved
    rec = Recorder(monkeypatch, outside)
    assert confined(outside / "x", [root]) is None
    assert rec.calls == []
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)   # an operator root that is a symlink
    assert confined(real / "x", [tmp_path / "alias"]) == real / "x"


def test_label_is_short(tree):
    root, _ = tree
    assert roots.label(str(root / "nested" / "b.duckdb")) == "stores/nested/b.duckdb"
