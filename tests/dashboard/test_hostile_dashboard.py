"""The dashboard against a hostile browser (Streamlit AppTest, no browser needed).

* A ``db`` URL parameter can only name a store the operator offers: anything else gets one message,
  the operator's store opens, and nothing outside the store roots is created, opened or stat-ed
  (recorded with ``fsrecorder.Recorder``); foreign files stay byte-identical.
* Run names, method labels and checkpoint text render literally (checked by rendering the Markdown
  the app sends with markdown-it, an independent CommonMark parser).
* Uploads are private to a session, listed only to it, and deletable by it.

Run: .venv/bin/pytest tests/dashboard/test_hostile_dashboard.py -q
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

import duckdb
import pytest
from streamlit.testing.v1 import AppTest

import factory
from fsrecorder import Recorder
from opdviz.io import roots
from opdviz.io import uploads
from opdviz.errors import StoreError
from synthetic import make_synthetic_store

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the pages package lives next to app.py

from opdviz.dashboard import cache, sidebar  # noqa: E402
from opdviz.dashboard.text import code, md, visible  # noqa: E402

TIMEOUT = 120
HOSTILE = "**bold** :smile: :material/home: :red[red] $x^2$ <b>h</b> [l](http://x) `c` # h"
METHOD = "# H1 _m_ :warning:"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A store root with the operator's store (a hostile run name and method; one run still running)
    and a second store, and a folder outside the root with a foreign DuckDB file."""
    tmp = tmp_path_factory.mktemp("hostile")
    root, outside = tmp / "stores", tmp / "outside"
    make_synthetic_store(root / "main.duckdb", runs=((HOSTILE, METHOD), ("RL", "RL"), ("sft:warning:", "SFT")),
                         layers=2, finished=False)
    make_synthetic_store(root / "team" / "other.duckdb", runs=(("other-run", "OPD"),), layers=2)
    outside.mkdir()
    con = duckdb.connect(str(outside / "foreign.duckdb"))
    con.execute("CREATE TABLE secrets AS SELECT 42 AS answer")
    con.close()
    (root / "escape.duckdb").symlink_to(outside / "foreign.duckdb")
    return root, outside


def _env(monkeypatch, root: Path, tmp: Path | None = None) -> None:
    monkeypatch.setenv("OPDVIZ_DB", str(root / "main.duckdb"))
    monkeypatch.setenv("OPDVIZ_STORE_ROOTS", str(root))
    monkeypatch.setenv("OPDVIZ_PREWARM", "0")
    if tmp is not None:
        monkeypatch.setenv("OPDVIZ_UPLOAD_DIR", str(tmp / "uploads"))
        monkeypatch.setenv("OPDVIZ_CHECKPOINT_ROOTS", str(tmp / "server"))
        (tmp / "server").mkdir(exist_ok=True)
    sidebar._stores.clear()


def _app(params: dict | None = None, page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    if params:
        at.query_params.update(params)
    at.run()
    if page:
        at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _snapshot(folder: Path) -> dict:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def rendered(markdown: str) -> tuple[str, str]:
    """(HTML, visible text) of ``markdown`` as a CommonMark renderer shows it."""
    mdit = pytest.importorskip("markdown_it")
    out = mdit.MarkdownIt("commonmark").render(markdown)
    return out, html.unescape(re.sub(r"<[^>]+>", "", out))


# ------------------------------------------------------------------------------- store from the URL
@pytest.mark.parametrize("value", [
    "{outside}/foreign.duckdb",                     # an existing DuckDB file: would be opened
    "{outside}/created.duckdb",                     # does not exist: would be created
    "{outside}/no/such/folder/x.duckdb",
    "{root}/../outside/foreign.duckdb",             # '..' out of the root
    "{root}/escape.duckdb",                         # a symlink in the root leading out
    "{root}/not-listed.duckdb",                     # inside the root, not a store
    "/etc/passwd",
    "{root}/main.duckdb\n",
])
def test_a_store_the_operator_did_not_offer_gets_one_message(monkeypatch, stores, value):
    root, outside = stores
    _env(monkeypatch, root)
    before = _snapshot(outside)
    listing = sorted(p.name for p in outside.iterdir())
    rec = Recorder(monkeypatch, outside)
    at = _app({"db": value.format(root=root, outside=outside)})
    errors = [e.value for e in at.sidebar.error]
    assert errors == [roots.REFUSED]                                  # one message, never "does not exist"
    assert not [e.value for e in at.main.error]
    assert at.sidebar.selectbox(key="f_db").value == str(root / "main.duckdb")   # the operator's store opened
    assert "db" not in at.query_params
    assert rec.calls == []                                            # nothing outside was stat-ed/opened/created
    assert sorted(p.name for p in outside.iterdir()) == listing
    assert _snapshot(outside) == before                               # the foreign file is byte-identical
    assert not (root / "not-listed.duckdb").exists()


def test_the_refusal_reads_the_same_for_a_path_that_exists_and_one_that_does_not(monkeypatch, stores):
    root, outside = stores
    _env(monkeypatch, root)
    texts = []
    for value in (outside / "foreign.duckdb", outside / "missing.duckdb"):
        at = _app({"db": str(value)})
        texts.append(([e.value for e in at.error], [i.value for i in at.info], [w.value for w in at.warning]))
    assert texts[0] == texts[1]


def test_stores_are_picked_from_a_list(monkeypatch, stores):
    root, outside = stores
    _env(monkeypatch, root)
    at = _app()
    box = at.sidebar.selectbox(key="f_db")
    assert box.options == ["stores/main.duckdb", "stores/team/other.duckdb"]     # labels; no foreign, no link
    assert not at.sidebar.text_input                                  # nothing to type a path into
    box.set_value(str(root / "team" / "other.duckdb")).run()
    assert not at.exception and not at.error
    assert at.query_params["db"] == str(root / "team" / "other.duckdb")
    assert "other-run" in at.dataframe[0].value["run_id"].tolist()
    again = _app({"db": str(root / "team" / "other.duckdb")})         # a bookmark of a listed store restores it
    assert again.sidebar.selectbox(key="f_db").value == str(root / "team" / "other.duckdb")
    assert not again.error


def test_the_new_analysis_queue_is_the_confined_stores(monkeypatch, stores, tmp_path):
    root, outside = stores
    _env(monkeypatch, root, tmp_path)
    rec = Recorder(monkeypatch, outside)
    at = _app({"db": str(outside / "foreign.duckdb")}, page="new_analysis")
    assert any(str(root / "main.duckdb") in c.value for c in at.caption)
    assert rec.calls == [] and not (outside / "foreign.duckdb.staging").exists()


# ------------------------------------------------------------------------------- literal text
def test_run_names_and_methods_render_literally(monkeypatch, stores):
    root, _ = stores
    _env(monkeypatch, root)
    at = _app()
    labels = [e.label for e in at.expander]
    hostile = [lab for lab in labels if "bold" in lab]
    assert hostile, labels
    for label in hostile:
        out, text = rendered(label)
        assert f"{HOSTILE} — {METHOD}" in text and "<strong>" not in out and "<a " not in out and "<h1" not in out
        assert "\\:smile\\:" in label and "\\$x^2\\$" in label.replace("\\^", "^")   # Streamlit's own syntax escaped
    notice = next(i.value for i in at.info if "still computing" in i.value)
    out, text = rendered(notice)
    assert "Run sft:warning: is still computing" in text and "\\:warning\\:" in notice
    bar = at.get("progress")[0].proto.text
    assert rendered(bar)[1].startswith("sft:warning:: ")
    labels = [at.sidebar.multiselect(key="f_runs").format_func(r) for r in at.sidebar.multiselect(key="f_runs").options]
    assert any(HOSTILE in lab for lab in labels)                       # option labels are plain text already


def test_a_library_message_with_markup_is_shown_as_text(monkeypatch, stores):
    root, _ = stores
    _env(monkeypatch, root)

    def broken(store, *args):
        raise StoreError("run **x** [click](http://evil) <img src=x> failed")

    monkeypatch.setitem(cache.QUERIES, "overview_table", broken)
    cache.cached.clear()
    try:
        at = _app()
        out, text = rendered(at.error[0].value)
        assert "run **x** [click](http://evil) <img src=x> failed" in text and "<a " not in out and "<img" not in out
    finally:
        cache.cached.clear()


@pytest.mark.parametrize("text", [HOSTILE, METHOD, "a`b``c", "`edge`", "line\nbreak\ttab\u202eRLO", "\\*not\\*", "1. x",
                                  "- item", "> quote", "| a | b |", "&amp; &#x41;", "<script>alert(1)</script>"])
def test_md_and_code_keep_any_text_literal(text):
    out, shown = rendered(md(text))
    assert shown.strip() == visible(text)
    assert not re.search(r"<(strong|em|a|h\d|ol|ul|blockquote|code|script|img)\b", out)
    out, shown = rendered(code(text))
    assert out.count("<code>") == 1 and shown.strip() == visible(text).strip()


# ------------------------------------------------------------------------------- uploads
def _upload(at: AppTest, files: list[Path]) -> None:
    at.get("file_uploader")[0].set_value([(p.name, p.read_bytes(), "application/octet-stream") for p in files])
    at.run()


def test_uploads_are_private_to_their_session_and_deletable(monkeypatch, stores, tmp_path):
    root, _ = stores
    _env(monkeypatch, root, tmp_path)
    cfg = factory.llama_config(layers=1, hidden=16, ffn=32, vocab=24)
    ck = factory.save_checkpoint(factory.make_llama_state(cfg), tmp_path / "src",
                                 config={**cfg, "architectures": ["**Evil** [x](http://e) :material/home:"]})
    a = _app(page="new_analysis")
    _upload(a, sorted(ck.iterdir()))
    assert not a.exception and not a.error, [e.value for e in a.error]
    summary = next(c.value for c in a.caption if "tensors in" in c.value)
    assert "**Evil** [x](http://e) :material/home:" in rendered(summary)[1] and "\\:material" in summary
    mine = next(e for e in a.expander if "Your uploads" in e.label)
    assert "Your uploads: 1" in mine.label
    sid = a.session_state["_na_upload_session"]
    stored = uploads.session_uploads(sid)
    assert len(stored) == 1 and stored[0].folder.parent == uploads.session_dir(sid)

    b = _app(page="new_analysis")                                      # another visitor
    assert b.session_state["_na_upload_session"] != sid
    assert not any("Your uploads" in e.label for e in b.expander)
    b.radio(key="na_source").set_value("Folders on this server").run()
    assert not b.exception
    assert any("No checkpoints under" in i.value for i in b.info)      # uploads are not server folders

    a.button(key=f"del_{stored[0].folder.name}").click().run()
    assert not a.exception and not a.error
    assert not stored[0].folder.exists() and uploads.session_uploads(sid) == []
    assert not any("Your uploads" in e.label for e in a.expander)


def test_an_upload_over_the_session_quota_is_refused_clearly(monkeypatch, stores, tmp_path):
    root, _ = stores
    _env(monkeypatch, root, tmp_path)
    monkeypatch.setenv("OPDVIZ_UPLOAD_SESSION_MB", "0.001")
    src = factory.save_checkpoint(factory.make_llama_state(), tmp_path / "big", single_file=True)
    at = _app(page="new_analysis")
    _upload(at, [src])
    shown = [rendered(e.value)[1] for e in at.error]
    assert any("over 0.001 MB, the limit per browser session (OPDVIZ_UPLOAD_SESSION_MB" in t for t in shown), shown
    assert not (tmp_path / "uploads").exists() or not any(p.is_file() for p in (tmp_path / "uploads").rglob("*"))
