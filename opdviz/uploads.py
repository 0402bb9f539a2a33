"""Checkpoints chosen in the browser: uploads saved safely, server folders confined, pairs validated.

``save_upload(root, files)`` stores uploaded files in ``root/<content hash>/`` (the same files
uploaded twice land in the same folder, stored once), with sanitised names, written to a temporary
folder and renamed into place so a half-written upload is never visible. ``checkpoint_in(folder)``
says what to open in such a folder. Server-side folders are confined to ``allowed_roots()``
(``OPDVIZ_CHECKPOINT_ROOTS``, ``os.pathsep``-separated; default ``data/demo`` under the repository;
the upload folder is always allowed); ``resolve_under_roots`` refuses anything that resolves
outside them (symlinks and ``..`` included). ``validate_checkpoint`` / ``validate_pair`` never
raise on bad input: they return reports whose ``errors`` say what is wrong and what to do.

    folder = save_upload(uploads_root(), [("model.safetensors", data), ("config.json", cfg)])
    report = validate_pair(checkpoint_in(folder), resolve_under_roots("data/demo/base"))

This module does not import torch at import time; validation does (through ``opdviz.reader``).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

REPO = Path(__file__).resolve().parent.parent
ROOTS_ENV = "OPDVIZ_CHECKPOINT_ROOTS"
UPLOAD_DIR_ENV = "OPDVIZ_UPLOAD_DIR"
MAX_MB_ENV = "OPDVIZ_MAX_UPLOAD_MB"
DEFAULT_MAX_MB = 4096
INDEX_NAME = "model.safetensors.index.json"
JSON_NAMES = ("config.json", INDEX_NAME, "generation_config.json", "metrics.json")
_CHUNK = 8 << 20
_MAX_JSON_BYTES = 64 << 20
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UploadError(CheckpointError):
    """An uploaded file or a chosen server path that the app refuses (name, size, location)."""


# ------------------------------------------------------------------------------------------ roots

def uploads_root() -> Path:
    """Where uploads are stored: ``OPDVIZ_UPLOAD_DIR``, default ``data/uploads`` in the repository."""
    return Path(os.environ.get(UPLOAD_DIR_ENV) or REPO / "data" / "uploads").expanduser().resolve()


def allowed_roots() -> list[Path]:
    """Folders the app may read checkpoints from: ``OPDVIZ_CHECKPOINT_ROOTS`` (``os.pathsep``-separated;
    default ``data/demo`` in the repository) plus the upload folder. Resolved, symlinks followed."""
    raw = os.environ.get(ROOTS_ENV)
    entries = [e for e in raw.split(os.pathsep) if e.strip()] if raw else [str(REPO / "data" / "demo")]
    roots = []
    for e in entries + [str(uploads_root())]:
        p = Path(e).expanduser().resolve()
        if p not in roots:
            roots.append(p)
    return roots


def resolve_under_roots(path: str | Path) -> Path:
    """``path`` resolved (symlinks and ``..`` followed); UploadError unless it lies under an allowed root."""
    text = str(path)
    if not text.strip() or any(_is_control(c) for c in text):
        raise UploadError(f"{text!r} is not a usable path (empty or with control characters)")
    resolved = Path(text).expanduser().resolve()
    roots = allowed_roots()
    if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
        raise UploadError(f"{path} resolves to {resolved}, outside the folders this app may read "
                          f"({', '.join(map(str, roots))}); copy the checkpoint under one of them or add its "
                          f"folder to {ROOTS_ENV}")
    return resolved


def list_checkpoints(root: str | Path | None = None, *, max_depth: int = 4) -> list[Path]:
    """Checkpoints under ``root`` (default: every allowed root): folders holding ``model.safetensors``
    or an index, and loose ``.safetensors`` files outside such folders. Only paths under the allowed
    roots are listed (a symlink leading elsewhere is left out); hidden folders are skipped."""
    roots = [resolve_under_roots(root)] if root is not None else [r for r in allowed_roots() if r.is_dir()]
    found: list[Path] = []
    for top in roots:
        if not top.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            here = Path(dirpath)
            depth = len(here.relative_to(top).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < max_depth)
            if INDEX_NAME in filenames or "model.safetensors" in filenames or (
                    "adapter_config.json" in filenames and "adapter_model.safetensors" in filenames):  # PEFT LoRA
                found.append(here)
                dirnames[:] = []  # its files are its shards
                continue
            found += [here / f for f in sorted(filenames) if f.endswith(".safetensors") and not f.startswith(".")]
            for d in _symlinked_dirs(here):  # not walked into (followlinks=False); a candidate only
                if (d / INDEX_NAME).is_file() or (d / "model.safetensors").is_file():
                    found.append(d)
    safe = []
    for p in found:
        try:
            resolve_under_roots(p)
        except UploadError:
            continue
        if p not in safe:
            safe.append(p)
    return safe


def cached_models() -> dict[str, str]:
    """Models in the operator's Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME``), offered beside the allowed
    folders: {snapshot path: "org/name[@ref]"} (``opdviz.hub.cached_models``; empty without huggingface_hub).
    Set ``OPDVIZ_LIST_HF_CACHE=0`` to not offer them."""
    if os.environ.get("OPDVIZ_LIST_HF_CACHE", "1").strip() == "0":
        return {}
    from .hub import cached_models as _cached

    out: dict[str, str] = {}
    for r in sorted(_cached(), key=lambda r: r["ref"] != "main"):     # one entry per snapshot, "main" first
        out.setdefault(str(r["path"]), r["id"] + (" (LoRA adapter)" if r["kind"] == "adapter" else ""))
    return out


def _symlinked_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_symlink() and p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


# ---------------------------------------------------------------------------------------- uploads

def max_upload_bytes() -> int:
    """The app's own size limit for one upload (all its files), from ``OPDVIZ_MAX_UPLOAD_MB``."""
    raw = os.environ.get(MAX_MB_ENV, "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_MAX_MB
    except ValueError:
        raise UploadError(f"{MAX_MB_ENV}={raw!r} is not a number of megabytes") from None
    return int(mb * (1 << 20))


def sanitize_name(name: str) -> str:
    """A safe plain file name for an uploaded ``name``.

    Directories are stripped (``a/b/model.safetensors`` → ``model.safetensors``); names with ``..``
    components or control characters, empty names and hidden names are refused; any other character
    outside ``[A-Za-z0-9._-]`` becomes ``_``."""
    if not isinstance(name, str):
        raise UploadError(f"file name {name!r} is not text")
    if any(_is_control(c) for c in name):
        raise UploadError(f"file name {name!r} contains control characters; rename the file and upload it again")
    parts = re.split(r"[/\\]", name)
    if any(p.strip() == ".." for p in parts):
        raise UploadError(f"file name {name!r} points outside its folder ('..'); upload the file under its plain name")
    base = parts[-1].strip()
    safe = _SAFE.sub("_", base)
    if not safe or set(safe) <= {"."} or safe.startswith("."):
        raise UploadError(f"file name {name!r} is empty or hidden after removing folders; rename the file")
    return safe[:200]


def _is_control(c: str) -> bool:
    return unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")


def _check_kind(name: str) -> None:
    if name.endswith(".safetensors"):
        return
    if name in JSON_NAMES:
        return
    low = name.lower()
    if low.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")):
        raise UploadError(f"{name}: pickled PyTorch checkpoints can run code when loaded and are not accepted "
                          "as uploads; convert them to safetensors first")
    raise UploadError(f"{name}: not a checkpoint file; upload .safetensors weights, and optionally "
                      f"{INDEX_NAME} (sharded models) and config.json")


def _size_of(data) -> int | None:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return len(data)
    size = getattr(data, "size", None)
    if isinstance(size, int):
        return size
    try:
        pos = data.tell()
        end = data.seek(0, io.SEEK_END)
        data.seek(pos)
        return end - pos
    except (AttributeError, OSError, ValueError):
        return None


def _chunks(data):
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for i in range(0, len(view), _CHUNK):
            yield view[i:i + _CHUNK]
        return
    if hasattr(data, "seek"):
        data.seek(0)
    while True:
        chunk = data.read(_CHUNK)
        if not chunk:
            return
        yield chunk


def save_upload(root: str | Path, files: list[tuple[str, object]]) -> Path:
    """Store uploaded ``files`` (name, bytes or binary file-like) as one checkpoint folder under ``root``.

    Returns ``root/<content hash>``; the hash covers the sanitised names and every file's content, so
    the same upload twice gives the same folder and is stored once. Raises UploadError for a refused
    name or kind, repeated names, an upload over ``OPDVIZ_MAX_UPLOAD_MB``, or a folder that cannot be
    written (nothing partial is left behind)."""
    if not files:
        raise UploadError("no files were uploaded")
    names = [sanitize_name(n) for n, _ in files]
    for n in names:
        _check_kind(n)
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UploadError(f"the same file name appears twice in one upload: {sorted(dup)}")
    limit = max_upload_bytes()
    sizes = [_size_of(d) for _, d in files]
    known = sum(s for s in sizes if s is not None)
    if known > limit:
        raise UploadError(f"the upload is {known / 2**20:.0f} MB, over the limit of {limit / 2**20:.0f} MB "
                          f"({MAX_MB_ENV}); raise the limit or pick the checkpoint from a server folder instead")
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(_mkdtemp(root))
    except OSError as exc:
        raise UploadError(f"cannot write uploads to {root}: {exc.strerror or exc}; check the folder is "
                          f"writable ({UPLOAD_DIR_ENV})") from exc
    try:
        digests = {}
        total = 0
        for name, (_, data) in sorted(zip(names, files)):
            h = hashlib.sha256()
            with open(tmp / name, "wb") as out:
                for chunk in _chunks(data):
                    total += len(chunk)
                    if total > limit:
                        raise UploadError(f"the upload is over the limit of {limit / 2**20:.0f} MB ({MAX_MB_ENV})")
                    h.update(chunk)
                    out.write(chunk)
            if name.endswith(".json") and (tmp / name).stat().st_size > _MAX_JSON_BYTES:
                raise UploadError(f"{name}: {(tmp / name).stat().st_size} bytes is too large for a JSON file")
            digests[name] = h.hexdigest()
        folder_hash = hashlib.sha256("".join(f"{n}\0{d}\n" for n, d in sorted(digests.items())).encode())
        final = root / folder_hash.hexdigest()[:24]
        if final.is_dir():
            shutil.rmtree(tmp)
            return final
        try:
            os.rename(tmp, final)
        except OSError:
            if final.is_dir():  # another session stored the same content meanwhile
                shutil.rmtree(tmp)
                return final
            raise
        return final
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UploadError(f"cannot store the upload in {root}: {exc.strerror or exc}; free disk space or "
                          f"choose another folder ({UPLOAD_DIR_ENV})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _mkdtemp(root: Path) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=".tmp-", dir=root)


def checkpoint_in(folder: str | Path) -> Path:
    """What to open in an upload folder: the folder (``model.safetensors`` or an index), or its only
    ``.safetensors`` file. UploadError when that is ambiguous or there are no weights."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / INDEX_NAME).is_file() or (folder / "model.safetensors").is_file():
        return folder
    weights = sorted(p for p in folder.glob("*.safetensors"))
    if len(weights) == 1:
        return weights[0]
    if not weights:
        raise UploadError("no .safetensors weights were uploaded (only "
                          f"{', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'})")
    raise UploadError(f"{len(weights)} .safetensors files but no {INDEX_NAME}: upload the index of the "
                      "sharded checkpoint too")


# ------------------------------------------------------------------------------------- validation

@dataclass
class ValidationReport:
    """What ``validate_checkpoint`` found. ``ok`` is False when ``errors`` is not empty."""

    path: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_tensors: int = 0
    n_files: int = 0
    total_bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)   # dtype → number of tensors
    config: dict = field(default_factory=dict)             # architecture summary from config.json

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        arch = self.config.get("architecture") or self.config.get("model_type") or "unknown architecture"
        layers = self.config.get("layers")
        dt = ", ".join(f"{k} ×{v}" for k, v in sorted(self.dtypes.items(), key=lambda kv: -kv[1]))
        return (f"{self.n_tensors} tensors in {self.n_files} file(s), {self.total_bytes / 1e6:,.1f} MB · {dt} · "
                f"{arch}" + (f", {layers} layers" if layers else ""))


@dataclass
class PairReport:
    """What ``validate_pair`` found: how many tensors will be analysed and what is skipped."""

    base: ValidationReport
    post: ValidationReport
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_analysed: int = 0
    n_skipped: int = 0
    bytes_to_read: int = 0
    mismatched: list[str] = field(default_factory=list)    # "name: base (a, b) vs post (c, b)"

    @property
    def ok(self) -> bool:
        return not self.errors and self.base.ok and self.post.ok


def _open(path, report):
    from .reader import Checkpoint

    try:
        return Checkpoint.open(path)
    except CheckpointError as exc:
        report.errors.append(str(exc))
    except OSError as exc:
        report.errors.append(f"{path}: cannot read ({exc.strerror or exc})")
    return None


def validate_checkpoint(path: str | Path) -> ValidationReport:
    """Open ``path`` with ``opdviz.reader.Checkpoint.open`` (headers, dtypes, shapes, offsets, index
    consistency, refusal of pickles) and summarise it. Never raises on bad input."""
    report = ValidationReport(Path(path))
    from .adapters import is_adapter

    if is_adapter(path):
        return _validate_adapter(path, report)
    ckpt = _open(path, report)
    if ckpt is None:
        return report
    with ckpt:
        report.n_tensors = len(ckpt.infos)
        report.n_files = len(ckpt.files)
        report.total_bytes = ckpt.total_bytes
        for info in ckpt.infos.values():
            report.dtypes[info.dtype] = report.dtypes.get(info.dtype, 0) + 1
        cfg = ckpt.config or {}
        archs = cfg.get("architectures") or []
        report.config = {k: v for k, v in {
            "architecture": archs[0] if archs else None, "model_type": cfg.get("model_type"),
            "layers": cfg.get("num_hidden_layers"), "hidden": cfg.get("hidden_size"),
            "vocab": cfg.get("vocab_size")}.items() if v is not None}
        if not ckpt.config:
            report.warnings.append("no config.json next to the weights: fused tensors are split using shapes only")
        if not any(i.is_float for i in ckpt.infos.values()):
            report.errors.append(f"{path}: no floating-point tensors to analyse (dtypes: {sorted(report.dtypes)})")
    return report


def _validate_adapter(path, report: ValidationReport) -> ValidationReport:
    """A PEFT LoRA adapter folder: its config and factors are checked; it is compared against a base."""
    from .adapters import LoraAdapter

    try:
        adapter = LoraAdapter.open(path)
    except CheckpointError as exc:
        report.errors.append(str(exc))
        return report
    with adapter.weights as w:
        report.n_tensors, report.n_files, report.total_bytes = len(w.infos), len(w.files), w.total_bytes
        for info in w.infos.values():
            report.dtypes[info.dtype] = report.dtypes.get(info.dtype, 0) + 1
    s = adapter.summary()
    report.config = {"architecture": f"LoRA adapter (r = {s['r']}, alpha = {s['lora_alpha']}"
                                     + (", rsLoRA" if s["use_rslora"] else "") + f", {s['n_lora_modules']} modules)"}
    return report


def validate_pair(base: str | Path, post: str | Path) -> PairReport:
    """Validate both checkpoints and plan their comparison with ``opdviz.reader.plan_pairs``: no common
    tensor is an error (different architectures); shape mismatches (a resized vocabulary) and missing
    tensors are warnings, listed. Never raises on bad input."""
    from .reader import plan_pairs

    report = PairReport(validate_checkpoint(base), validate_checkpoint(post))
    if not (report.base.ok and report.post.ok):
        return report
    b = _open(base, report)
    if b is None:
        return report
    try:
        from .adapters import open_post

        p = open_post(post, b)          # a LoRA adapter is read as its merge into this base
    except CheckpointError as exc:
        b.close()
        report.errors.append(str(exc))
        return report
    with b, p:
        try:
            items = plan_pairs(b, p)
        except CheckpointError:
            report.errors.append(
                f"different architectures: the base and the post-trained checkpoint share no tensor name "
                f"(base has e.g. {list(b.infos)[:3]}, post has e.g. {list(p.infos)[:3]}); pick the post-trained "
                "checkpoint of this base")
            return report
    ok = [i for i in items if i.status == "ok"]
    skipped = [i for i in items if i.status != "ok"]
    report.n_analysed, report.n_skipped = len(ok), len(skipped)
    report.bytes_to_read = sum(i.base.nbytes + i.post.nbytes for i in ok)
    report.mismatched = [f"{i.name}: {i.reason}" for i in skipped if i.reason.startswith("shape mismatch")]
    if report.mismatched:
        report.warnings.append(f"{len(report.mismatched)} tensor(s) differ in shape and will be skipped: "
                               + "; ".join(report.mismatched[:8]) + (" …" if len(report.mismatched) > 8 else ""))
    other = [i for i in skipped if not i.reason.startswith("shape mismatch")]
    if other:
        reasons: dict[str, int] = {}
        for i in other:
            reasons[i.reason] = reasons.get(i.reason, 0) + 1
        report.warnings.append(f"{len(other)} more tensor(s) will be skipped: "
                               + "; ".join(f"{n} × {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])))
    return report
