"""Model IDs from the local Hugging Face cache: resolution, offline by default, errors, CLI and batch use."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

import factory  # noqa: E402
from opdviz.io import hub  # noqa: E402
from opdviz.cli import main  # noqa: E402
from opdviz.errors import CheckpointError  # noqa: E402
from opdviz.io.reader import Checkpoint  # noqa: E402
from opdviz.store import Store  # noqa: E402


def cache_model(cache: Path, repo_id: str, folder: Path, *, commit: str, refs=("main",)) -> Path:
    """Put ``folder``'s files in ``cache`` as huggingface_hub does: blobs named by hash, snapshot symlinks
    ``snapshots/<commit>/<file> -> ../../blobs/<hash>``, and ``refs/<ref>`` holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch, llama_pair):
    cache = tmp_path / "hf" / "hub"
    base, post = llama_pair
    b = cache_model(cache, "acme/tiny-base", base, commit="a" * 40)
    p = cache_model(cache, "acme/tiny-opd", post, commit="b" * 40, refs=("main", "v1"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")       # belt and braces: the tests never reach the network
    return {"cache": cache, "base": b, "post": p, "base_src": base, "post_src": post}


def test_resolves_ids_and_revisions_from_the_cache(hf_cache):
    assert hub.resolve_checkpoint("acme/tiny-base") == hf_cache["base"]
    assert hub.resolve_checkpoint("acme/tiny-opd@v1") == hf_cache["post"]
    assert hub.resolve_checkpoint("acme/tiny-opd@" + "b" * 40) == hf_cache["post"]
    snap = hub.locate("acme/tiny-opd@v1")
    assert (snap.repo_id, snap.revision, snap.commit) == ("acme/tiny-opd", "v1", "b" * 40)
    assert snap.root == hf_cache["cache"] / "models--acme--tiny-opd"
    assert hub.allowed_root(snap.path) == snap.root
    # the snapshot's files are symlinks into the repo's blobs; the reader opens them
    assert (hf_cache["base"] / "model-00001-of-00002.safetensors").is_symlink()
    with Checkpoint.open("acme/tiny-base") as ck, Checkpoint.open(hf_cache["base_src"]) as src:
        assert ck.path == hf_cache["base"]
        assert ck.fingerprint() == src.fingerprint()


def test_hf_hub_cache_wins_over_hf_home(hf_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub.cache_dir() == tmp_path / "elsewhere"
    with pytest.raises(CheckpointError, match="elsewhere"):
        hub.resolve_checkpoint("acme/tiny-base")


def test_missing_model_names_the_cache_and_the_fetch_command(hf_cache):
    with pytest.raises(CheckpointError) as e:
        hub.resolve_checkpoint("acme/not-there@dev")
    msg = str(e.value)
    assert str(hf_cache["cache"]) in msg
    assert "hf download acme/not-there --revision dev" in msg and "--download" in msg
    with pytest.raises(CheckpointError, match="no such file or folder"):
        hub.resolve_checkpoint("./acme/tiny-base")       # a path spelling is never looked up as an ID


def test_offline_unless_download_is_asked(hf_cache, monkeypatch):
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    hub.resolve_checkpoint("acme/tiny-base")
    hub.prefetch(["acme/tiny-base"], download=False)
    assert [c["local_files_only"] for c in calls] == [True]
    hub.prefetch(["acme/tiny-base", str(hf_cache["base_src"])], download=True)
    assert calls[-1]["local_files_only"] is False
    assert calls[-1]["allow_patterns"] == ["*.safetensors", "*.json"]
    assert len(calls) == 2          # the local path was not looked up


def test_an_existing_local_path_wins(hf_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = factory.save_checkpoint(factory.make_llama_state(seed=5), tmp_path / "acme" / "tiny-base")
    assert hub.resolve_checkpoint("acme/tiny-base") == Path("acme/tiny-base")
    with Checkpoint.open("acme/tiny-base") as ck:
        assert ck.path.resolve() == local.resolve()


def test_symlink_leaving_the_repo_folder_is_refused(hf_cache, tmp_path):
    snap = hf_cache["base"]
    outside = tmp_path / "outside.safetensors"
    shard = snap / "model-00002-of-00002.safetensors"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside"):
        Checkpoint.open("acme/tiny-base")


def test_cached_models_lists_refs(hf_cache):
    rows = hub.cached_models()
    ids = {r["id"]: r for r in rows}
    assert set(ids) == {"acme/tiny-base", "acme/tiny-opd", "acme/tiny-opd@v1"}
    assert ids["acme/tiny-opd@v1"]["path"] == hf_cache["post"]
    assert all(r["kind"] == "model" for r in rows)


def test_cli_compute_with_ids(hf_cache, tmp_path, capsys):
    db = tmp_path / "s.duckdb"
    rc = main(["compute", "acme/tiny-base", "acme/tiny-opd@v1", "--db", str(db), "--no-progress",
               "--include", "layers.0.self_attn", "--spectrum", "approx"])
    assert rc == 0, capsys.readouterr().err
    run = Store(db).runs().set_index("run_id").loc["tiny-opd@v1"]
    assert run["status"] == "done"
    assert run["base_path"] == str(hf_cache["base"].resolve())
    rc = main(["compute", "acme/absent", "acme/tiny-opd", "--db", str(db), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "hf download acme/absent" in err and "Traceback" not in err


def test_batch_file_with_ids(hf_cache, tmp_path):
    from opdviz.engine.batch import load_batch

    f = tmp_path / "b.json"
    f.write_text(json.dumps({"bases": [{"path": "acme/tiny-base",
                                        "posts": [{"path": "acme/tiny-opd@v1", "method": "OPD"}]}]}))
    batch = load_batch(f, tmp_path / "s.duckdb")
    (spec,) = batch.specs
    assert spec.base == hf_cache["base"] and spec.post == hf_cache["post"] and spec.run_id == "tiny-opd@v1"
    f.write_text(json.dumps({"bases": [{"path": "acme/nope", "posts": [{"path": "acme/tiny-opd"}]}]}))
    with pytest.raises(Exception, match="acme/nope"):
        load_batch(f, tmp_path / "s.duckdb")


def test_dashboard_lists_cached_models_beside_folders(hf_cache, monkeypatch, tmp_path):
    import sys

    from streamlit.testing.v1 import AppTest

    from opdviz.io import folders, validation

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    monkeypatch.setenv("OPDVIZ_CHECKPOINT_ROOTS", str(tmp_path / "roots"))
    monkeypatch.setenv("OPDVIZ_UPLOAD_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("OPDVIZ_DB", str(tmp_path / "s.duckdb"))
    monkeypatch.setenv("OPDVIZ_PREWARM", "0")
    factory.save_checkpoint(factory.make_llama_state(seed=2), tmp_path / "roots" / "local-post")
    cached = folders.cached_models()
    assert cached[str(hf_cache["base"])] == "acme/tiny-base"
    at = AppTest.from_file(str(root / "pages" / "new_analysis.py"), default_timeout=120)
    at.run()
    at.radio(key="na_source").set_value("Folders on this server").run()
    box = at.selectbox(key="na_base_Folder")
    labels = [box.format_func(o) for o in box.options] if hasattr(box, "format_func") else box.options
    assert any("HF cache · acme/tiny-base" in str(x) for x in labels), labels
    assert any("local-post" in str(x) for x in labels), labels
    box.set_value(str(hf_cache["base"])).run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("tensors in" in c.value for c in at.caption), [c.value for c in at.caption]
    report = validation.validate_pair(hf_cache["base"], hf_cache["post"])
    assert report.ok and report.n_analysed > 0
    monkeypatch.setenv("OPDVIZ_LIST_HF_CACHE", "0")
    assert folders.cached_models() == {}


def test_without_huggingface_hub_a_missing_path_says_both(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"no such file or folder.*opdviz\[hf\]"):
        Checkpoint.open("runs/final")
    with pytest.raises(Exception, match=r"opdviz\[hf\]") as e:
        hub.locate("acme/x")
    assert isinstance(e.value, ImportError)
    assert hub.cached_models() == []
