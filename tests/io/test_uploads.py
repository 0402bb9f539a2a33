"""Uploads and server paths: sanitised names, content-hash dedup, confinement to the allowed roots,
and a clear validation message for every bad input the "New analysis" page can receive."""

from __future__ import annotations

import io
import json
import os
import struct
import time

import pytest
import torch

import factory
from opdviz.io.folders import allowed_roots, list_checkpoints, resolve_under_roots
from opdviz.io.uploads import UploadError, checkpoint_in, sanitize_name, save_upload
from opdviz.io.validation import validate_checkpoint, validate_pair


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """Two allowed roots in tmp_path (server folders and uploads) and one folder outside them."""
    server, uploads, outside = tmp_path / "server", tmp_path / "uploads", tmp_path / "outside"
    for d in (server, uploads, outside):
        d.mkdir()
    monkeypatch.setenv("OPDVIZ_CHECKPOINT_ROOTS", str(server))
    monkeypatch.setenv("OPDVIZ_UPLOAD_DIR", str(uploads))
    return server, uploads, outside


def small_sd(seed=0, **cfg):
    return factory.make_llama_state(factory.llama_config(layers=1, hidden=16, ffn=32, vocab=24, **cfg), seed=seed)


def st_bytes(tmp_path, sd=None, name="m.safetensors") -> bytes:
    path = factory.save_checkpoint(sd or small_sd(), tmp_path / f"src-{name}", single_file=True)
    return path.read_bytes()


# ------------------------------------------------------------------------------------ names

@pytest.mark.parametrize("name, expected", [
    ("model.safetensors", "model.safetensors"),
    ("some/dir/model-00001-of-00002.safetensors", "model-00001-of-00002.safetensors"),
    ("C:\\Users\\me\\config.json", "config.json"),
    ("my model (1).safetensors", "my_model_1_.safetensors"),
    ("mödel.safetensors", "m_del.safetensors"),
])
def test_sanitize_keeps_a_plain_safe_name(name, expected):
    assert sanitize_name(name) == expected


@pytest.mark.parametrize("name, words", [
    ("../model.safetensors", "outside its folder"),
    ("a/../../etc/passwd", "outside its folder"),
    ("..", "outside its folder"),
    ("model\x00.safetensors", "control characters"),
    ("mo\ndel.safetensors", "control characters"),
    ("x\u202e.safetensors", "control characters"),
    ("", "empty"),
    ("dir/", "empty"),
    (".hidden.safetensors", "hidden"),
])
def test_sanitize_refuses_dangerous_names(name, words):
    with pytest.raises(UploadError, match=words):
        sanitize_name(name)


# ------------------------------------------------------------------------------------ saving

def test_same_content_is_stored_once(tmp_path):
    data = st_bytes(tmp_path)
    cfg = json.dumps(factory.llama_config()).encode()
    a = save_upload(tmp_path / "up", [("model.safetensors", data), ("config.json", cfg)])
    b = save_upload(tmp_path / "up", [("config.json", io.BytesIO(cfg)), ("dir/model.safetensors", io.BytesIO(data))])
    assert a == b and sorted(p.name for p in a.iterdir()) == ["config.json", "model.safetensors"]
    assert (a / "model.safetensors").read_bytes() == data
    assert [p.name for p in (tmp_path / "up").iterdir()] == [a.name]  # no second copy, no temp left
    c = save_upload(tmp_path / "up", [("model.safetensors", data[:-1] + b"\1")])
    assert c != a


@pytest.mark.parametrize("files, words", [
    ([("model.bin", b"PK\x03\x04" + b"\0" * 60)], "pickled"),
    ([("notes.txt", b"hello")], "not a checkpoint file"),
    ([("../model.safetensors", b"x")], "outside its folder"),
    ([("a\x07.safetensors", b"x")], "control characters"),
    ([("a/model.safetensors", b"x"), ("b/model.safetensors", b"y")], "twice"),
    ([], "no files"),
])
def test_refused_uploads_leave_nothing_behind(tmp_path, files, words):
    with pytest.raises(UploadError, match=words):
        save_upload(tmp_path / "up", files)
    assert not (tmp_path / "up").exists() or not any((tmp_path / "up").iterdir())


def test_size_limit_is_the_apps_own_and_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("OPDVIZ_MAX_UPLOAD_MB", "0.001")  # ~1 KB
    with pytest.raises(UploadError, match="over the limit of .*OPDVIZ_MAX_UPLOAD_MB"):
        save_upload(tmp_path / "up", [("model.safetensors", b"\0" * 4096)])
    with pytest.raises(UploadError, match="over the limit"):  # a stream of unknown size is stopped while copied
        save_upload(tmp_path / "up", [("model.safetensors", _Unsized(b"\0" * 4096))])
    assert not any((tmp_path / "up").iterdir())


class _Unsized:
    def __init__(self, data):
        self._b = io.BytesIO(data)

    def read(self, n=-1):
        return self._b.read(n)


def test_unwritable_upload_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UploadError, match="cannot write uploads"):
        save_upload(blocker / "up", [("model.safetensors", b"x")])


def test_checkpoint_in_picks_the_folder_or_its_only_file(tmp_path):
    sharded = factory.save_checkpoint(small_sd(), tmp_path / "s", shards=2)
    assert checkpoint_in(sharded) == sharded
    one = save_upload(tmp_path / "up", [("weights.safetensors", st_bytes(tmp_path))])
    assert checkpoint_in(one) == one / "weights.safetensors"
    two = save_upload(tmp_path / "up", [("a.safetensors", b"1"), ("b.safetensors", b"2")])
    with pytest.raises(UploadError, match="index"):
        checkpoint_in(two)


# ------------------------------------------------------------------------------------ roots

def test_paths_outside_the_roots_are_refused(roots):
    server, uploads, outside = roots
    ck = factory.save_checkpoint(small_sd(), server / "base")
    assert resolve_under_roots(ck) == ck.resolve()
    assert resolve_under_roots(uploads) == uploads.resolve()
    factory.save_checkpoint(small_sd(), outside / "secret")
    with pytest.raises(UploadError, match="outside the folders this app may read"):
        resolve_under_roots(outside / "secret")
    with pytest.raises(UploadError, match="outside"):
        resolve_under_roots(server / ".." / "outside" / "secret")          # '..'
    (server / "link").symlink_to(outside / "secret")
    with pytest.raises(UploadError, match="outside"):
        resolve_under_roots(server / "link")                               # a symlink leading out
    with pytest.raises(UploadError, match="outside"):
        resolve_under_roots("/etc/passwd")
    with pytest.raises(UploadError, match="control characters"):
        resolve_under_roots(str(server) + "/a\nb")


def test_list_checkpoints_lists_only_checkpoints_under_the_roots(roots):
    server, uploads, outside = roots
    a = factory.save_checkpoint(small_sd(), server / "a", shards=2)
    b = factory.save_checkpoint(small_sd(), server / "nested" / "b")
    f = factory.save_checkpoint(small_sd(), server / "loose", single_file=True)
    (server / "notes.txt").write_text("x")
    factory.save_checkpoint(small_sd(), outside / "secret")
    (server / "link-out").symlink_to(outside / "secret")
    (server / "link-in").symlink_to(a)
    found = list_checkpoints()
    assert set(found) == {a, b, f, server / "link-in"}
    assert not any("secret" in str(p.resolve()) for p in found)
    assert list_checkpoints(server / "nested") == [b]
    with pytest.raises(UploadError):
        list_checkpoints(outside)
    assert uploads in allowed_roots() and outside not in allowed_roots()


# ------------------------------------------------------------------------------------ validation

def test_valid_pair_reports_what_will_be_analysed(tmp_path):
    base, post = factory.make_pair(tmp_path)
    rep = validate_pair(base, post)
    assert rep.ok and not rep.errors and not rep.warnings
    assert rep.n_analysed == len(factory.make_llama_state()) and rep.n_skipped == 0
    assert rep.base.config["architecture"] == "LlamaForCausalLM" and rep.base.dtypes == {"BF16": rep.n_analysed}
    assert rep.base.n_files == 2 and rep.post.n_files == 3 and "tensors in 2 file(s)" in rep.base.summary()


def write_bad(path, kind):
    """Hand-made broken files, one per way a download or an upload goes wrong."""
    good = factory.save_checkpoint(small_sd(), path.parent / f"good-{kind}", single_file=True).read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    data = {
        "text": b"this is not a checkpoint at all\n",
        "pickle": b"\x80\x04\x95" + b"\0" * 64,
        "zip-pickle": b"PK\x03\x04" + b"\0" * 64,
        "truncated": good[: len(good) // 2],
        "corrupt-header": good[:8] + b"{" * n + good[8 + n:],
        "header-cap": struct.pack("<Q", 200_000_000) + b"{}",
        "tiny": b"\1\2",
    }[kind]
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind, words", [
    ("text", "header"),
    ("pickle", "pickled"),
    ("zip-pickle", "pickled"),
    ("truncated", "truncated"),
    ("corrupt-header", "corrupt"),
    ("header-cap", "exceeds the safetensors cap"),
    ("tiny", "too small"),
])
def test_broken_files_are_reported_not_raised(tmp_path, kind, words):
    bad = write_bad(tmp_path / "weights.safetensors", kind)
    rep = validate_checkpoint(bad)
    assert not rep.ok and words in rep.errors[0]
    assert "Traceback" not in rep.errors[0]
    pair = validate_pair(factory.save_checkpoint(small_sd(), tmp_path / "base"), bad)
    assert not pair.ok and pair.post.errors


def test_uploaded_broken_file_goes_through_the_same_checks(tmp_path):
    folder = save_upload(tmp_path / "up", [("model.safetensors", write_bad(tmp_path / "x", "truncated").read_bytes())])
    rep = validate_checkpoint(checkpoint_in(folder))
    assert not rep.ok and "truncated" in rep.errors[0]


def test_index_naming_a_file_outside_its_folder(tmp_path):
    ck = factory.save_checkpoint(small_sd(), tmp_path / "ck", shards=2)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere/model.safetensors"
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    rep = validate_checkpoint(ck)
    assert not rep.ok and "not a plain file name" in rep.errors[0]


def test_different_architectures_is_an_error(tmp_path):
    base = factory.save_checkpoint(small_sd(), tmp_path / "base")
    other = factory.save_checkpoint({"transformer.h.0.attn.c_attn.weight": torch.zeros(8, 24)}, tmp_path / "gpt2")
    rep = validate_pair(base, other)
    assert not rep.ok and "different architectures" in rep.errors[0]


def test_partial_shape_mismatch_is_a_warning_listing_the_tensors(tmp_path):
    base = small_sd()
    post = dict(base)
    post["model.embed_tokens.weight"] = torch.zeros(32, 16, dtype=torch.bfloat16)   # vocab 24 → 32
    post["lm_head.weight"] = torch.zeros(32, 16, dtype=torch.bfloat16)
    b = factory.save_checkpoint(base, tmp_path / "b")
    p = factory.save_checkpoint(post, tmp_path / "p")
    rep = validate_pair(b, p)
    assert rep.ok and rep.n_analysed == len(base) - 2 and rep.n_skipped == 2
    assert len(rep.mismatched) == 2 and "resized vocabulary" in rep.warnings[0]
    assert "model.embed_tokens.weight" in rep.warnings[0] and "lm_head.weight" in rep.warnings[0]


def test_missing_path_is_reported(tmp_path):
    rep = validate_checkpoint(tmp_path / "nope")
    assert not rep.ok and "no such file" in rep.errors[0]


def test_upload_folder_is_not_world_writable(tmp_path):
    folder = save_upload(tmp_path / "up", [("model.safetensors", b"abc")])
    assert not os.stat(folder).st_mode & 0o002


# ------------------------------------------------------------------------ sessions, quotas, age

from opdviz.io import folders as Fo  # noqa: E402
from opdviz.io import uploads as U  # noqa: E402


@pytest.fixture
def up(tmp_path, monkeypatch):
    """An upload folder in tmp_path and two browser sessions."""
    monkeypatch.setenv("OPDVIZ_UPLOAD_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("OPDVIZ_CHECKPOINT_ROOTS", str(tmp_path / "server"))
    (tmp_path / "server").mkdir()
    for env in ("OPDVIZ_UPLOAD_SESSION_MB", "OPDVIZ_UPLOAD_TOTAL_MB", "OPDVIZ_UPLOAD_MAX_AGE_H", "OPDVIZ_MAX_UPLOAD_MB"):
        monkeypatch.delenv(env, raising=False)
    return U.new_session_id(), U.new_session_id()


def test_each_session_sees_only_its_own_uploads(up, tmp_path):
    a, b = up
    folder = U.save_session_upload(a, [("model.safetensors", st_bytes(tmp_path))])
    assert folder.parent == U.session_dir(a) and a != b and len(a) == 32
    assert [u.folder for u in U.session_uploads(a)] == [folder]
    assert U.session_uploads(b) == []
    assert Fo.list_checkpoints() == []                                    # the server picker lists no upload
    with pytest.raises(UploadError, match="outside the folders"):       # b cannot queue a's upload
        resolve_under_roots(folder / "model.safetensors", [*Fo.checkpoint_roots(), U.session_dir(b)])
    assert resolve_under_roots(folder, [*Fo.checkpoint_roots(), U.session_dir(a)]) == folder.resolve()


@pytest.mark.parametrize("sid", ["", "../x", "0" * 31, "0" * 33, "A" * 32, "g" * 32, "0" * 31 + "/", None])
def test_a_session_id_can_name_no_other_folder(up, sid):
    with pytest.raises(UploadError, match="no valid upload id"):
        U.session_dir(sid)


def test_the_session_quota_is_checked_before_writing(up, monkeypatch):
    a, b = up
    monkeypatch.setenv("OPDVIZ_UPLOAD_SESSION_MB", "0.01")               # ~10 KB
    U.save_session_upload(a, [("a.safetensors", b"\0" * 6000)])
    before = sorted(p.name for p in U.session_dir(a).iterdir())

    class NeverRead(io.BytesIO):                                        # size known up front, bytes never read
        size = 6000

        def read(self, *args):
            raise AssertionError("read before the quota was checked")

    with pytest.raises(UploadError, match=r"limit per browser session \(OPDVIZ_UPLOAD_SESSION_MB"):
        U.save_session_upload(a, [("b.safetensors", NeverRead())])
    assert sorted(p.name for p in U.session_dir(a).iterdir()) == before  # nothing written, no temp left
    U.save_session_upload(b, [("b.safetensors", b"\0" * 6000)])         # another session has its own quota


def test_the_total_quota_counts_every_session(up, monkeypatch):
    a, b = up
    monkeypatch.setenv("OPDVIZ_UPLOAD_TOTAL_MB", "0.01")
    U.save_session_upload(a, [("a.safetensors", b"\0" * 6000)])
    with pytest.raises(UploadError, match=r"upload space is full.*OPDVIZ_UPLOAD_TOTAL_MB"):
        U.save_session_upload(b, [("b.safetensors", b"\0" * 6000)])
    with pytest.raises(UploadError, match="upload space is full"):      # a stream of unknown size: while copying
        U.save_session_upload(b, [("b.safetensors", _Unsized(b"\0" * 6000))])
    assert not U.session_dir(b).exists() or not any(U.session_dir(b).iterdir())


@pytest.mark.parametrize("env, value, words", [
    ("OPDVIZ_UPLOAD_SESSION_MB", "lots", "not a number"),
    ("OPDVIZ_UPLOAD_TOTAL_MB", "-1", "positive"),
    ("OPDVIZ_UPLOAD_TOTAL_MB", "nan", "positive"),
])
def test_bad_quota_settings_are_clear_errors(up, monkeypatch, env, value, words):
    monkeypatch.setenv(env, value)
    with pytest.raises(UploadError, match=f"{env}.*{words}"):
        U.save_session_upload(up[0], [("a.safetensors", b"x")])


def test_a_user_deletes_their_own_upload_only(up, tmp_path):
    a, b = up
    mine = U.save_session_upload(a, [("model.safetensors", st_bytes(tmp_path))])
    theirs = U.save_session_upload(b, [("model.safetensors", st_bytes(tmp_path, name="t.safetensors"))])
    data = (theirs / "model.safetensors").read_bytes()
    with pytest.raises(UploadError, match="not one of this session's"):
        U.delete_upload(a, theirs)
    assert (theirs / "model.safetensors").read_bytes() == data
    with pytest.raises(UploadError, match="queued or running analysis still reads"):
        U.delete_upload(a, mine, keep=(str(mine / "model.safetensors"),))
    U.delete_upload(a, mine)
    assert not mine.exists() and U.session_uploads(a) == [] and theirs.exists()


def test_abandoned_uploads_are_swept_after_the_age(up, tmp_path, monkeypatch):
    a, b = up
    old = U.save_session_upload(a, [("model.safetensors", b"old")])
    kept = U.save_session_upload(b, [("model.safetensors", b"in use")])
    root = U.uploads_root()
    (root / ".tmp-crashed").mkdir()                                     # an interrupted upload
    (root / "operator-notes").mkdir()                                   # not opdviz's: never removed
    day_ago = time.time() - 25 * 3600
    for p in (U.session_dir(a), U.session_dir(b), root / ".tmp-crashed", root / "operator-notes"):
        os.utime(p, (day_ago, day_ago))
    fresh = U.new_session_id()
    U.save_session_upload(fresh, [("model.safetensors", b"new")])
    removed = U.sweep_uploads(keep=(str(kept / "model.safetensors"),))
    assert set(removed) == {U.session_dir(a), root / ".tmp-crashed"}
    assert not old.exists() and kept.exists() and U.session_uploads(fresh)
    assert (root / "operator-notes").is_dir()
    monkeypatch.setenv("OPDVIZ_UPLOAD_MAX_AGE_H", "0.5")
    os.utime(U.session_dir(fresh), (time.time() - 3600, time.time() - 3600))
    assert set(U.sweep_uploads()) == {U.session_dir(fresh), U.session_dir(b)}   # b: its job is over (no keep)
    assert (root / "operator-notes").is_dir()


def test_using_a_session_keeps_its_uploads(up):
    a, _ = up
    U.save_session_upload(a, [("model.safetensors", b"x")])
    day_ago = time.time() - 25 * 3600
    os.utime(U.session_dir(a), (day_ago, day_ago))
    U.touch_session(a)                                                  # the page does this on every load
    assert U.sweep_uploads() == [] and U.session_uploads(a)


@pytest.mark.parametrize("length", [200, 255])
def test_long_names_are_kept_whole(tmp_path, length):
    name = "m" * (length - len(".safetensors")) + ".safetensors"
    folder = save_upload(tmp_path / "up", [(name, b"x")])
    assert [p.name for p in folder.iterdir()] == [name]


def test_a_name_too_long_is_refused_not_cut(tmp_path):
    name = "m" * 250 + ".safetensors"
    with pytest.raises(UploadError, match=r"262 characters long, over the limit of 255.*rename the file"):
        save_upload(tmp_path / "up", [(name, b"x")])
    assert not (tmp_path / "up").exists() or not any((tmp_path / "up").iterdir())


def test_a_starting_worker_sweeps_abandoned_uploads(up, tmp_path):
    from opdviz.engine import queue as jobs

    a, _ = up
    U.save_session_upload(a, [("model.safetensors", b"x")])
    day_ago = time.time() - 25 * 3600
    os.utime(U.session_dir(a), (day_ago, day_ago))
    assert jobs.work(tmp_path / "db" / "s.duckdb", idle_exit_s=0, poll_s=0) is True     # empty queue: starts, sweeps, exits
    assert not U.session_dir(a).exists()
