"""Tests for opdviz.io.reader: opening/validating checkpoints, pairing tensors, streaming pairs."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

import opdviz.io.reader as reader
from opdviz.errors import CheckpointError
from opdviz.io.reader import Checkpoint, iter_pairs, plan_pairs
from factory import llama_config, make_llama_state, make_pair, post_train, save_checkpoint


@pytest.fixture(scope="module")
def state():
    return make_llama_state(llama_config(), seed=0)


def _layout(sd, root, layout):
    """Save ``sd`` in one of the supported layouts; return the path to open."""
    if layout == "file":
        return save_checkpoint(sd, root, single_file=True)
    if layout == "folder":
        return save_checkpoint(sd, root, config=llama_config())
    return save_checkpoint(sd, root, shards=int(layout.split("-")[1]), config=llama_config())


# ------------------------------------------------------------------------------------------ opening

@pytest.mark.parametrize("layout", ["file", "folder", "shards-3"])
def test_open_reads_back_bit_identical(tmp_path, state, layout):
    path = _layout(state, tmp_path / "ckpt", layout)
    with Checkpoint.open(path) as ck:
        assert set(ck.infos) == set(state)
        assert ck.total_bytes == sum(t.numel() * t.element_size() for t in state.values())
        assert (ck.config is not None) == (layout != "file")
        for name, t in state.items():
            info = ck.infos[name]
            assert info.shape == tuple(t.shape) and info.dtype == "BF16" and info.is_float
            got = ck.load(name)
            assert got.dtype == t.dtype and torch.equal(got.view(torch.int16), t.view(torch.int16))
        # stored order: by file, then offset
        keys = [(ck.files.index(i.file), i.offset) for i in ck.infos.values()]
        assert keys == sorted(keys)


def test_config_invalid_json_is_none(tmp_path, state):
    folder = save_checkpoint(state, tmp_path / "c", config=llama_config())
    (folder / "config.json").write_text("{not json")
    assert Checkpoint.open(folder).config is None


def test_sharded_base_vs_differently_sharded_post(tmp_path):
    base_dir, post_dir = make_pair(tmp_path, base_shards=2, post_shards=3)
    cfg = llama_config()
    base_sd = make_llama_state(cfg, seed=0)
    post_sd = post_train(base_sd, seed=1)
    with Checkpoint.open(base_dir) as b, Checkpoint.open(post_dir) as p:
        assert len(b.files) == 2 and len(p.files) == 3
        items = plan_pairs(b, p)
        assert all(it.status == "ok" for it in items) and len(items) == len(base_sd)
        seen = 0
        for item, wb, wp in iter_pairs(b, p, items):
            assert torch.equal(wb, base_sd[item.name]) and torch.equal(wp, post_sd[item.name])
            assert wb.dtype == torch.bfloat16
            seen += 1
        assert seen == len(base_sd)


def test_iter_pairs_reads_each_shard_in_one_run(tmp_path, monkeypatch):
    """Reads are grouped by shard: each base shard is visited in one contiguous run of reads, and
    each post shard too (here), so the page cache streams each file once."""
    base_dir, post_dir = make_pair(tmp_path, base_shards=2, post_shards=3)
    visited = []
    real = Checkpoint._read

    def recording(self, info):
        visited.append(str(info.file))
        return real(self, info)

    monkeypatch.setattr(Checkpoint, "_read", recording)
    with Checkpoint.open(base_dir) as b, Checkpoint.open(post_dir) as p:
        items = plan_pairs(b, p)
        runs = [(it.base.file, it.post.file) for it in items]
        n = sum(1 for _ in iter_pairs(b, p, items))
    assert n == len(items)
    # each (base shard, post shard) combination is one contiguous run of the plan
    starts = [r for i, r in enumerate(runs) if i == 0 or runs[i - 1] != r]
    assert len(starts) == len(set(starts))
    for side, count in (("/base/", 2), ("/post/", 3)):
        seq = [f for f in visited if side in f]
        switches = [f for i, f in enumerate(seq) if i == 0 or seq[i - 1] != f]
        assert len(switches) == len(set(switches)) == count


def test_plain_reads_match_safe_open(tmp_path):
    """The CPU read path (plain readinto, no mmap) returns exactly what safetensors' safe_open does."""
    base_dir, _ = make_pair(tmp_path, base_shards=2, post_shards=1)
    with Checkpoint.open(base_dir) as ck:
        for name, info in ck.infos.items():
            with reader.safe_open(str(info.file), framework="pt") as f:
                ref = f.get_tensor(name)
            got = ck.load(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape and torch.equal(got, ref)


def test_fingerprint(tmp_path, state):
    a = save_checkpoint(state, tmp_path / "a", shards=2)
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    fp = Checkpoint.open(a).fingerprint()
    assert len(fp) == 64 and fp == Checkpoint.open(copy).fingerprint()

    changed = dict(state)
    first = next(iter(Checkpoint.open(a).infos))  # first tensor of the first shard: inside the first MiB
    t = changed[first].clone()
    t.view(-1)[0] += 1
    changed[first] = t
    b = save_checkpoint(changed, tmp_path / "b", shards=2)
    assert Checkpoint.open(b).fingerprint() != fp


def test_fingerprint_samples_large_files(tmp_path):
    # 4 MiB of data: the fingerprint reads the first, middle and last MiB, not the bytes in between
    big = torch.zeros(1 << 20, dtype=torch.float32)
    fp = _ck(tmp_path, "a", {"w": big}).fingerprint()
    first = big.clone()
    first[1000] = 1.0                       # byte ~4 KB: inside the first MiB
    assert _ck(tmp_path, "b", {"w": first}).fingerprint() != fp
    gap = big.clone()
    gap[(1 << 20) * 5 // 16] = 1.0          # byte ~1.25 MiB: between the samples, by design not covered
    assert _ck(tmp_path, "c", {"w": gap}).fingerprint() == fp


# ----------------------------------------------------------------------------------------- matching

def _ck(tmp_path, name, sd):
    return Checkpoint.open(save_checkpoint(sd, tmp_path / name, single_file=True))


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_alias_matching(tmp_path, state, prefix):
    post_sd = {(prefix + k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    b, p = _ck(tmp_path, "b", state), _ck(tmp_path, "p", post_sd)
    items = plan_pairs(b, p)
    assert all(it.status == "ok" for it in items) and len(items) == len(state)
    it = next(i for i in items if i.name == "model.norm.weight")
    assert it.post.name == prefix + "norm.weight"
    for item, wb, wp in iter_pairs(b, p, items[:3]):
        assert torch.equal(wb, wp)


def test_visual_alias(tmp_path):
    w = torch.randn(4, 4)
    b = _ck(tmp_path, "b", {"visual.blocks.0.attn.qkv.weight": w})
    p = _ck(tmp_path, "p", {"model.visual.blocks.0.attn.qkv.weight": w})
    [item] = plan_pairs(b, p)
    assert item.status == "ok" and item.name == "visual.blocks.0.attn.qkv.weight"


W = torch.randn(8, 4)


@pytest.mark.parametrize("name, base_t, post_t, status, words", [
    ("model.embed_tokens.weight", torch.randn(96, 8), torch.randn(100, 8), "skipped",
     ["shape mismatch", "(96, 8)", "(100, 8)", "resized vocabulary"]),
    ("w", W.bfloat16(), W.float(), "skipped", ["dtype mismatch: BF16 vs F32"]),
    ("pos_ids", torch.arange(8), torch.arange(8), "skipped", ["not a float tensor (I64)"]),
    ("flag", torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool), "skipped", ["not a float", "BOOL"]),
    ("fp8", W.to(torch.float8_e4m3fn), W.to(torch.float8_e4m3fn), "skipped", ["not a float", "F8_E4M3", "quantized"]),
    ("empty", torch.zeros(0, 8), torch.zeros(0, 8), "skipped", ["empty tensor (shape (0, 8))"]),
    ("norm", torch.randn(8), torch.randn(8), "ok", []),
    ("experts", torch.randn(2, 3, 4), torch.randn(2, 3, 4), "ok", []),
])
def test_plan_statuses(tmp_path, name, base_t, post_t, status, words):
    anchor = {"anchor": torch.randn(2, 2)}  # keeps at least one ok pair so plan_pairs does not raise
    b = _ck(tmp_path, "b", {**anchor, name: base_t})
    p = _ck(tmp_path, "p", {**anchor, name: post_t})
    items = {it.name: it for it in plan_pairs(b, p)}
    it = items[name]
    assert it.status == status
    assert (it.reason == "") == (status == "ok")
    for w in words:
        assert w in it.reason


def test_missing_on_either_side_and_order(tmp_path):
    shared = {f"t{i}": torch.randn(4, 4) for i in range(3)}
    b = _ck(tmp_path, "b", {**shared, "only_base": torch.randn(2)})
    p = _ck(tmp_path, "p", {**shared, "only_post": torch.randn(2)})
    items = plan_pairs(b, p)
    by = {it.name: it for it in items}
    assert by["only_base"].reason == "missing in post-trained checkpoint" and by["only_base"].post is None
    assert by["only_post"].reason == "missing in base checkpoint" and by["only_post"].base is None
    statuses = [it.status for it in items]
    assert statuses == ["ok"] * 3 + ["skipped"] * 2  # ok first, skipped after
    assert [it.base.offset for it in items[:3]] == sorted(it.base.offset for it in items[:3])
    assert [item.name for item, _, _ in iter_pairs(b, p, items)] == [it.name for it in items[:3]]


def test_no_tensors_in_common(tmp_path):
    b = _ck(tmp_path, "b", {"a.weight": torch.randn(2, 2)})
    p = _ck(tmp_path, "p", {"z.weight": torch.randn(2, 2)})
    with pytest.raises(CheckpointError, match="no tensors in common") as e:
        plan_pairs(b, p)
    assert "same architecture" in str(e.value) and "a.weight" in str(e.value) and "z.weight" in str(e.value)


# ---------------------------------------------------------------------------------------- bad input

def _write_raw(path, header_len: int, body: bytes):
    path.write_bytes(struct.pack("<Q", header_len) + body)
    return path


def _truncated(tmp_path):
    p = save_checkpoint({"a": torch.randn(64, 64)}, tmp_path, single_file=True)
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    return p


def _corrupt_json(tmp_path):
    return _write_raw(tmp_path / "x.safetensors", 11, b'{"a": {"dty')


def _over_cap(tmp_path):
    return _write_raw(tmp_path / "x.safetensors", 200_000_000, b"{}")


def _beyond_size(tmp_path):
    return _write_raw(tmp_path / "x.safetensors", 1000, b"{}" + b" " * 8)


def _overlap(tmp_path):
    h = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    return _write_raw(tmp_path / "x.safetensors", len(h), h + bytes(12))


def _bad_dtype(tmp_path):
    h = json.dumps({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return _write_raw(tmp_path / "x.safetensors", len(h), h + bytes(8))


def _bad_span(tmp_path):
    h = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    return _write_raw(tmp_path / "x.safetensors", len(h), h + bytes(8))


def _index(tmp_path, weight_map_or_text):
    save_checkpoint({"a": torch.randn(2)}, tmp_path / "ck", shards=2)
    text = weight_map_or_text if isinstance(weight_map_or_text, str) else json.dumps(
        {"weight_map": weight_map_or_text})
    (tmp_path / "ck" / "model.safetensors.index.json").write_text(text)
    return tmp_path / "ck"


def _missing_shard(tmp_path):
    return _index(tmp_path, {"a": "model-00009-of-00009.safetensors"})


def _dotdot(tmp_path):
    save_checkpoint({"a": torch.randn(2)}, tmp_path, single_file=True)
    return _index(tmp_path, {"a": "../weights.safetensors"})


def _absolute(tmp_path):
    p = save_checkpoint({"a": torch.randn(2)}, tmp_path, single_file=True)
    return _index(tmp_path, {"a": str(p)})


def _symlink_outside(tmp_path):
    outside = save_checkpoint({"a": torch.randn(2)}, tmp_path / "elsewhere", single_file=True)
    folder = _index(tmp_path, {"a": "link.safetensors"})
    (folder / "link.safetensors").symlink_to(outside)
    return folder


def _index_bad_json(tmp_path):
    return _index(tmp_path, "{oops")


def _index_no_weight_map(tmp_path):
    return _index(tmp_path, json.dumps({"metadata": {}}))


def _listed_but_absent(tmp_path):
    return _index(tmp_path, {"a": "model-00001-of-00002.safetensors", "ghost": "model-00001-of-00002.safetensors"})


def _pickle_refused(tmp_path):
    p = tmp_path / "model.pt"
    torch.save({"a": torch.randn(2)}, p)
    return p


def _pickle_named_safetensors(tmp_path):
    p = tmp_path / "model.safetensors"
    torch.save({"a": torch.randn(2)}, p)
    return p


def _nonexistent(tmp_path):
    return tmp_path / "nope"


def _no_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("hi")
    return tmp_path / "empty"


@pytest.mark.parametrize("make, words", [
    (_truncated, ["weights.safetensors", "file is", "header needs", "truncated"]),
    (_corrupt_json, ["x.safetensors", "corrupt", "JSON"]),
    (_over_cap, ["x.safetensors", "exceeds", "100 MB"]),
    (_beyond_size, ["x.safetensors", "file is 18 bytes but its header needs 1008"]),
    (_overlap, ["x.safetensors", "overlaps", "'b'"]),
    (_bad_dtype, ["x.safetensors", "unknown dtype", "Q7"]),
    (_bad_span, ["x.safetensors", "data_offsets span 8", "12 bytes"]),
    (_missing_shard, ["model.safetensors.index.json", "model-00009-of-00009", "does not exist"]),
    (_dotdot, ["index.json", "../weights.safetensors", "not a plain file name"]),
    (_absolute, ["index.json", "not a plain file name"]),
    (_symlink_outside, ["link.safetensors", "symlink", "outside"]),
    (_index_bad_json, ["model.safetensors.index.json", "not valid JSON"]),
    (_index_no_weight_map, ["model.safetensors.index.json", "weight_map"]),
    (_listed_but_absent, ["index.json", "'ghost'", "model-00001-of-00002.safetensors", "no such tensor"]),
    (_pickle_refused, ["model.pt", "looks like a pickled PyTorch checkpoint",
                       "pass --allow-pickle to load it with torch.load(weights_only=True)"]),
    (_pickle_named_safetensors, ["model.safetensors", "pickled", "--allow-pickle"]),
    (_nonexistent, ["nope", "no such file or folder"]),
    (_no_weights, ["empty", "no model weights", "README.md"]),
])
def test_bad_input_raises_helpful_error(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_hf_cache_symlinks_into_blobs_are_followed(tmp_path, state):
    # huggingface_hub stores snapshots/<rev>/model.safetensors -> ../../blobs/<sha>
    repo = tmp_path / "models--org--name"
    src = save_checkpoint(state, tmp_path / "src")
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    shutil.move(src / "model.safetensors", repo / "blobs" / "deadbeef")
    (snap / "model.safetensors").symlink_to("../../blobs/deadbeef")
    with Checkpoint.open(snap) as ck:
        assert torch.equal(ck.load("model.norm.weight"), state["model.norm.weight"])


@pytest.mark.parametrize("layout", ["file", "legacy-file", "nested-file", "folder", "sharded"])
def test_pickle_opt_in(tmp_path, layout):
    sd = {"model.norm.weight": torch.randn(8).bfloat16(), "lm_head.weight": torch.randn(4, 8)}
    if layout == "file":
        path = tmp_path / "model.bin"
        torch.save(sd, path)
    elif layout == "legacy-file":  # pre-1.6 format: no zip, so no mmap
        path = tmp_path / "model.pt"
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif layout == "nested-file":  # training checkpoint: {"state_dict": ..., "epoch": ...}
        path = tmp_path / "ckpt.pt"
        torch.save({"state_dict": sd, "epoch": 3}, path)
    else:
        path = tmp_path / "ck"
        path.mkdir()
        if layout == "folder":
            torch.save(sd, path / "pytorch_model.bin")
        else:
            wm = {}
            for i, (k, v) in enumerate(sd.items()):
                fn = f"pytorch_model-{i + 1:05d}-of-00002.bin"
                torch.save({k: v}, path / fn)
                wm[k] = fn
            (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Checkpoint.open(path)
    with Checkpoint.open(path, allow_pickle=True) as ck:
        assert ck.format == "pickle"
        assert ck.infos["model.norm.weight"].dtype == "BF16" and ck.infos["lm_head.weight"].shape == (4, 8)
        for k, v in sd.items():
            assert torch.equal(ck.load(k), v)
        assert len(ck.fingerprint()) == 64


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"a": torch.randn(2), "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpoint.open(path, allow_pickle=True)


def test_load_unknown_name(tmp_path, state):
    with Checkpoint.open(save_checkpoint(state, tmp_path / "c")) as ck:
        with pytest.raises(CheckpointError, match="no tensor named"):
            ck.load("nope")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_iter_pairs_on_cuda(tmp_path):
    base_dir, post_dir = make_pair(tmp_path)
    with Checkpoint.open(base_dir) as b, Checkpoint.open(post_dir) as p:
        for _, wb, wp in iter_pairs(b, p, plan_pairs(b, p), device="cuda"):
            assert wb.is_cuda and wp.is_cuda
