"""Checkpoint reading: validate a base/post-trained pair up front, then stream it one tensor pair at a time.

``Checkpoint.open(path)`` accepts a ``.safetensors`` file, a folder with ``model.safetensors``, or a
sharded Hugging Face folder with ``model.safetensors.index.json``. Every safetensors header is parsed
and checked (``opdviz.io.headers``: length, JSON, dtypes, offsets, file size) and the shard index checked
against the shards here, before any tensor is read, so a broken
download fails at once with a message naming the file instead of halfway through a long job. Every
file is read through ``opdviz.io.safefiles``: shards and side files must be regular files of the folder itself
(no symlinks, except the Hugging Face cache's links into its blobs), and JSON and headers are parsed under
size, depth and tensor-count caps (``Limits``, set by the operator's environment).
Pickled PyTorch checkpoints (``.bin``/``.pt``) run code when unpickled; they are refused unless
``allow_pickle=True``, and even then are loaded with ``torch.load(weights_only=True, mmap=True)``
(``opdviz.io.pickled``).

``plan_pairs(base, post)`` matches tensors by name (with the known VLM/LLaVA prefix aliases) and says
which pairs can be compared and why the others are skipped; ``iter_pairs`` then yields
``(item, w_base, w_post)`` in stored order, grouped by shard, holding one open file per side.

    with Checkpoint.open("base") as b, Checkpoint.open("post") as p:
        for item, wb, wp in iter_pairs(b, p, plan_pairs(b, p)):
            ...
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from opdviz.errors import CheckpointError
from opdviz.io.headers import TensorInfo, read_header, stored_order
from opdviz.io.pickled import looks_pickled, pickle_infos, torch_load
from opdviz.io.safefiles import Limits, checked_file, open_checked, read_json

# Name aliases: the same weight saved under a transformers version that nests the text model
# (Qwen2-VL/Qwen2.5-VL/LLaVA after the 4.52 refactor) and one that does not. Each long prefix is
# rewritten to its short form before matching, so either side may use either spelling.
ALIASES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.visual.", "visual."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_INDEX = "pytorch_model.bin.index.json"
_MIB = 1 << 20
_PICKLE_HINT = "pass --allow-pickle to load it with torch.load(weights_only=True)"


_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


@dataclass(frozen=True)
class PairItem:
    """One planned comparison: a base tensor and its post-trained counterpart, or why it is skipped."""

    name: str                # canonical name: the base's stored name when both sides exist
    base: TensorInfo | None
    post: TensorInfo | None
    status: str              # "ok" | "skipped"
    reason: str              # "" when ok


class Checkpoint:
    """A validated checkpoint (one file or a sharded folder); tensors are read lazily by ``load``."""

    def __init__(self, path: Path, files: tuple[Path, ...], infos: dict[str, TensorInfo],
                 config: dict | None, fmt: str):
        self.path = path
        self.files = files
        self.infos = infos
        self.config = config
        self.format = fmt                     # "safetensors" | "pickle"
        self.total_bytes = sum(i.nbytes for i in infos.values())
        self._handle = None                   # (file, device, safe_open handle or state dict)

    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False, limits: Limits | None = None) -> "Checkpoint":
        """Open and validate a checkpoint.

        Args:
            path: a ``.safetensors`` file, a folder with ``model.safetensors`` or with
                ``model.safetensors.index.json`` (shards), or, only with ``allow_pickle``, a
                ``.bin``/``.pt`` file or a folder with ``pytorch_model.bin`` (+ its index); or a Hugging
                Face model ID ``org/name[@revision]`` that is not a local path, read from the local cache
                (``opdviz.io.hub``; never downloaded here).
            allow_pickle: load pickled checkpoints with ``torch.load(weights_only=True, mmap=True)``.
            limits: caps on file sizes, JSON depth and tensor count (default: ``Limits.from_env()``).
        Raises:
            CheckpointError: anything unreadable, with the file and what to do.
        """
        limits = limits or Limits.from_env()
        path = Path(path).expanduser()
        if not path.exists():
            from opdviz.io.hub import looks_like_repo_id, resolve_checkpoint

            if not looks_like_repo_id(str(path)):
                raise CheckpointError(f"{path}: no such file or folder; check the checkpoint path")
            path = resolve_checkpoint(str(path))        # a Hub model ID: its snapshot in the local cache, offline
        if path.is_dir():
            return cls._open_folder(path, allow_pickle, limits)
        config = _read_config(path.parent, limits)
        # the file itself was named by the user: a symlink to it is theirs to make; read what it points at
        path = path.resolve()
        if looks_pickled(path):
            return cls._open_pickle(path, [path], None, config, allow_pickle, limits)
        return cls(path, (path,), stored_order(read_header(path, limits, limits.tensors)), config, "safetensors")

    @classmethod
    def _open_folder(cls, folder: Path, allow_pickle: bool, limits: Limits) -> "Checkpoint":
        config = _read_config(folder, limits)
        if os.path.lexists(folder / _SAFETENSORS_INDEX):
            index_path = folder / _SAFETENSORS_INDEX
            weight_map = _read_index(index_path, limits)
            files = sorted(set(weight_map.values()), key=lambda f: f.name)
            headers, budget = {}, limits.tensors
            for f in files:
                if looks_pickled(f):
                    raise CheckpointError(f"{f}: listed in {index_path.name} as safetensors but looks like a "
                                          "pickled PyTorch checkpoint; re-save it with safetensors")
                headers[f] = read_header(f, limits, budget)
                budget -= len(headers[f])
            return cls(folder, tuple(files), _indexed_infos(index_path, weight_map, headers), config,
                       "safetensors")
        if os.path.lexists(folder / "model.safetensors"):
            f = _shard_path(folder, "model.safetensors", folder)
            return cls(folder, (f,), stored_order(read_header(f, limits, limits.tensors)), config, "safetensors")
        if os.path.lexists(folder / _PICKLE_INDEX):
            weight_map = _read_index(folder / _PICKLE_INDEX, limits)
            files = sorted(set(weight_map.values()), key=lambda f: f.name)
            return cls._open_pickle(folder, files, (folder / _PICKLE_INDEX, weight_map), config, allow_pickle,
                                    limits)
        if os.path.lexists(folder / "pytorch_model.bin"):
            f = _shard_path(folder, "pytorch_model.bin", folder)
            return cls._open_pickle(folder, [f], None, config, allow_pickle, limits)
        if (folder / "adapter_config.json").is_file():
            raise CheckpointError(f"{folder}: is a PEFT adapter (adapter_config.json), not a full checkpoint; "
                                  "analyse it as the post-trained side against its base model")
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise CheckpointError(
            f"{folder}: no model weights found (expected model.safetensors or {_SAFETENSORS_INDEX}; "
            f"found {found or 'an empty folder'}); point at the folder or file holding the weights")

    @classmethod
    def _open_pickle(cls, path: Path, files: list[Path], index, config, allow_pickle: bool,
                     limits: Limits) -> "Checkpoint":
        if not allow_pickle:
            raise CheckpointError(f"{files[0]}: looks like a pickled PyTorch checkpoint, which can run code when "
                                  f"loaded; it is refused by default; {_PICKLE_HINT}, or convert it to safetensors")
        headers = {f: pickle_infos(f) for f in files}
        if sum(map(len, headers.values())) > limits.tensors:
            raise CheckpointError(f"{path}: holds more than {limits.tensors} tensors (OPDVIZ_MAX_TENSORS); "
                                  "refusing to open it")
        infos = _indexed_infos(index[0], index[1], headers) if index else stored_order(headers[files[0]])
        return cls(path, tuple(files), infos, config, "pickle")

    def fingerprint(self) -> str:
        """A cheap identity of the checkpoint's content, as a sha256 hex string.

        Covers: every tensor's (name, shape, dtype), sorted by name; and per file, in order, its size and
        its first, middle and last 1 MiB (the header and a sample of the data). Does not cover file names
        or paths (a copy fingerprints the same), nor bytes outside those samples: two files of equal size
        that differ only elsewhere collide. Used to link runs that share a base, not as a checksum.
        """
        h = hashlib.sha256(b"opdviz-fingerprint-v1\n")
        for name in sorted(self.infos):
            i = self.infos[name]
            h.update(f"{name}\t{list(i.shape)}\t{i.dtype}\n".encode())
        for f in self.files:
            with open_checked(f) as fh:
                size = os.fstat(fh.fileno()).st_size
                h.update(f"file\t{size}\n".encode())
                for start in (0, max(0, size // 2 - _MIB // 2), max(0, size - _MIB)):
                    fh.seek(start)
                    h.update(fh.read(_MIB))
        return h.hexdigest()

    def load(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor in its stored dtype onto ``device``. Keeps one file open, switching when the
        tensor lives in another file, so reading in stored order opens each shard once."""
        info = self.infos.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        device = str(device)
        if self.format == "safetensors" and device == "cpu" and info.dtype in _TORCH_DTYPES:
            return self._read(info)
        try:
            if self._handle is None or self._handle[:2] != (info.file, device):
                self.close()
                open_checked(info.file).close()    # still the regular file checked at open()
                if self.format == "pickle":
                    handle = torch_load(info.file)
                else:
                    handle = safe_open(str(info.file), framework="pt", device=device)
                self._handle = (info.file, device, handle)
            handle = self._handle[2]
            if self.format == "pickle":
                return handle[name].to(device)
            return handle.get_tensor(name)
        except (CheckpointError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as e:  # the file changed or vanished since open(): say which one
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}; "
                                  "was the file modified after the job started?") from e

    def _read(self, info: TensorInfo) -> torch.Tensor:
        """Read one tensor's bytes with plain ``readinto`` into a fresh tensor.

        Why not safe_open on CPU: it memory-maps the shard, and every page it touches stays in this
        process's RSS as long as the shard is open (a 1 GB embedding shard counts fully), so peak
        memory grew with shard size. Plain reads go through the page cache, which is not ours.
        """
        out = torch.empty(info.shape, dtype=_TORCH_DTYPES[info.dtype])
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        try:
            with open_checked(info.file, buffering=0) as fh:
                fh.seek(info.offset)
                got = fh.readinto(buf) if buf is not None else 0
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r}: {e}") from e
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: tensor {info.name!r} is cut short ({got} of {info.nbytes} "
                                  "bytes); was the file modified after the job started?")
        return out

    def close(self) -> None:
        """Release the open file (safe to call twice)."""
        if self._handle is not None:
            handle = self._handle[2]
            self._handle = None
            if hasattr(handle, "__exit__"):
                handle.__exit__(None, None, None)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Checkpoint({str(self.path)!r}, {len(self.files)} file(s), {len(self.infos)} tensors, "
                f"{self.total_bytes / 1e9:.2f} GB)")


# ---------------------------------------------------------------------------------------- matching

def canonical_name(name: str) -> str:
    """The name with a known long prefix replaced by its short alias (``model.language_model.x`` → ``model.x``)."""
    for long, short in ALIASES:
        if name.startswith(long):
            return short + name[len(long):]
    return name


def plan_pairs(base: Checkpoint, post: Checkpoint) -> list[PairItem]:
    """Match base and post tensors by name (exact first, then through ``ALIASES``).

    Returns every tensor of both sides once: "ok" items ordered by (base file, post file, base offset),
    so each base shard is opened once and, within it, post shards are visited in runs (the two sides
    usually shard differently, and safetensors sorts tensors inside a shard by dtype and name, so pure
    base order would switch post shards back and forth); then "skipped" items with their reason.
    Raises CheckpointError when nothing can be compared.
    """
    matched: dict[str, str] = {n: n for n in base.infos if n in post.infos}
    post_by_canon: dict[str, str] = {}
    for n in post.infos:
        if n not in matched:
            post_by_canon.setdefault(canonical_name(n), n)
    for n in base.infos:
        if n not in matched:
            p = post_by_canon.pop(canonical_name(n), None)
            if p is not None:
                matched[n] = p
    used_post = set(matched.values())

    ok, skipped = [], []
    for n, b in base.infos.items():                      # base.infos is already in stored order
        p = post.infos.get(matched[n]) if n in matched else None
        reason = _skip_reason(b, p)
        (skipped if reason else ok).append(PairItem(n, b, p, "skipped" if reason else "ok", reason))
    for n, p in post.infos.items():
        if n not in used_post:
            skipped.append(PairItem(n, None, p, "skipped", "missing in base checkpoint"))
    if not ok:
        raise CheckpointError(
            f"no tensors in common between {base.path} and {post.path}: are these checkpoints of the same "
            f"architecture? base has e.g. {list(base.infos)[:4]}, post has e.g. {list(post.infos)[:4]}")
    base_rank = {f: i for i, f in enumerate(base.files)}
    post_rank = {f: i for i, f in enumerate(post.files)}
    ok.sort(key=lambda it: (base_rank[it.base.file], post_rank[it.post.file], it.base.offset))
    return ok + skipped


def _skip_reason(b: TensorInfo, p: TensorInfo | None) -> str:
    if p is None:
        return "missing in post-trained checkpoint"
    if b.shape != p.shape:
        hint = ""
        if (len(b.shape) == len(p.shape) and b.shape[1:] == p.shape[1:]
                and any(k in b.name for k in ("embed", "lm_head", "wte", "output"))):
            hint = " (resized vocabulary?)"
        return f"shape mismatch: base {b.shape} vs post {p.shape}{hint}"
    if b.dtype != p.dtype:
        return f"dtype mismatch: {b.dtype} vs {p.dtype}"
    if not b.is_float:
        if b.dtype.startswith(("F8", "F6", "F4")):
            return (f"not a float tensor for analysis ({b.dtype}: low-bit floats are quantized with separate "
                    "scales; compare dequantized checkpoints)")
        return f"not a float tensor ({b.dtype})"
    if b.numel == 0:
        return f"empty tensor (shape {b.shape})"
    return ""


def iter_pairs(base: Checkpoint, post: Checkpoint, items: Iterable[PairItem],
               device: str | torch.device = "cpu") -> Iterator[tuple[PairItem, torch.Tensor, torch.Tensor]]:
    """Yield ``(item, w_base, w_post)`` for each "ok" item, in the given order, in stored dtypes.

    Each side keeps one open file, switching when the shard changes; only the current pair is held
    here. The caller's loop variables still hold the previous pair while the next one is read, so
    ``del`` them at the end of the loop body to keep the peak at one pair.
    """
    for item in items:
        if item.status != "ok":
            continue
        w_base = base.load(item.base.name, device)
        w_post = post.load(item.post.name, device)
        yield item, w_base, w_post
        del w_base, w_post


# ------------------------------------------------------------------------------- shard index, config

def _read_index(index_path: Path, limits: Limits) -> dict[str, Path]:
    """Read an HF shard index; return tensor name → shard path, each shard checked to be inside the folder."""
    folder = index_path.parent
    index = read_json(folder, index_path.name, limits)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: missing or empty 'weight_map' (tensor name → shard file); "
                              "re-download the index file")
    if len(weight_map) > limits.tensors:
        raise CheckpointError(f"{index_path}: lists {len(weight_map)} tensors, more than the {limits.tensors} "
                              "allowed per checkpoint (OPDVIZ_MAX_TENSORS)")
    shards: dict[str, Path] = {}
    out = {}
    for name, shard in weight_map.items():
        if shard not in shards:
            shards[shard] = _shard_path(folder, shard, index_path)
        out[name] = shards[shard]
    return out


def _shard_path(folder: Path, shard, source: Path) -> Path:
    """Refuse shard names that could read outside the checkpoint folder (the index is untrusted input), and
    shards that are symlinks (but the HF cache's) or not regular files (``opdviz.io.safefiles.checked_file``)."""
    return checked_file(folder, shard, source)


def _indexed_infos(index_path: Path, weight_map: dict[str, Path],
                   per_file: dict[Path, dict[str, TensorInfo]]) -> dict[str, TensorInfo]:
    """Merge per-shard headers under the index: listed tensors must exist in their shard. A tensor a shard
    holds but the index omits is kept (loaders read whole shards) unless the index places it elsewhere."""
    infos = {}
    for name, f in weight_map.items():
        info = per_file[f].get(name)
        if info is None:
            raise CheckpointError(f"{index_path}: lists tensor {name!r} in {f.name}, but {f} has no such tensor; "
                                  "the index and shards disagree; re-download them together")
        infos[name] = info
    for f, header in per_file.items():
        for name, info in header.items():
            infos.setdefault(name, info)
    rank = {f: i for i, f in enumerate(per_file)}
    return dict(sorted(infos.items(), key=lambda kv: (rank[kv[1].file], kv[1].offset, kv[0])))


def _read_config(folder: Path, limits: Limits) -> dict | None:
    """``config.json`` next to the weights, or None. Optional: a missing file or bad JSON syntax only loses
    architecture hints, but a symlink, an oversized or too deeply nested file is refused."""
    config = read_json(folder, "config.json", limits, lenient=True)
    return config if isinstance(config, dict) else None


