"""Checkpoints chosen in the browser: uploads saved privately, server folders confined, pairs validated.

Uploads are private to a browser session: ``save_session_upload(session_id, files)`` stores them in
``<upload dir>/<session id>/<content hash>/`` (``new_session_id()`` is unguessable and kept in the
session only; the same files uploaded twice by one session are stored once), with sanitised names,
written to a temporary folder and renamed into place so a half-written upload is never visible, after
checking the per-upload, per-session and total quotas (``OPDVIZ_MAX_UPLOAD_MB``,
``OPDVIZ_UPLOAD_SESSION_MB``, ``OPDVIZ_UPLOAD_TOTAL_MB``). ``session_uploads`` lists a session's own
uploads, ``delete_upload`` removes one, ``sweep_uploads`` removes those not used for
``OPDVIZ_UPLOAD_MAX_AGE_H`` hours (the New analysis page and a starting job worker call it). ``checkpoint_in(folder)`` says what to open in such a folder.

Server-side folders are confined to ``checkpoint_roots()`` (``OPDVIZ_CHECKPOINT_ROOTS``,
``os.pathsep``-separated; default ``data/demo`` under the repository); ``resolve_under_roots`` checks a
path lexically against the roots before touching the file system, then refuses anything that resolves
outside them (symlinks and ``..`` included). ``validate_checkpoint`` / ``validate_pair`` never raise on
bad input: they return reports whose ``errors`` say what is wrong and what to do.

    sid = new_session_id()
    folder = save_session_upload(sid, [("model.safetensors", data), ("config.json", cfg)])
    report = validate_pair(checkpoint_in(folder), resolve_under_roots("data/demo/base"))

This module does not import torch at import time; validation does (through ``opdviz.io.reader``).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import shutil
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from opdviz.errors import CheckpointError
from opdviz.io.roots import confined, lexically_under, resolve_within

REPO = Path(__file__).resolve().parent.parent
ROOTS_ENV = "OPDVIZ_CHECKPOINT_ROOTS"
UPLOAD_DIR_ENV = "OPDVIZ_UPLOAD_DIR"
MAX_MB_ENV = "OPDVIZ_MAX_UPLOAD_MB"
SESSION_MB_ENV = "OPDVIZ_UPLOAD_SESSION_MB"
TOTAL_MB_ENV = "OPDVIZ_UPLOAD_TOTAL_MB"
MAX_AGE_ENV = "OPDVIZ_UPLOAD_MAX_AGE_H"
DEFAULT_MAX_MB = 4096
DEFAULT_SESSION_MB = 16384
DEFAULT_TOTAL_MB = 65536
DEFAULT_MAX_AGE_H = 24.0
MAX_NAME = 255            # bytes in a file name on common file systems (names are ASCII once sanitised)
INDEX_NAME = "model.safetensors.index.json"
JSON_NAMES = ("config.json", INDEX_NAME, "generation_config.json", "metrics.json")
_CHUNK = 8 << 20
_MAX_JSON_BYTES = 64 << 20
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SESSION = re.compile(r"^[0-9a-f]{32}$")
_OURS = re.compile(r"^([0-9a-f]{32}|[0-9a-f]{24}|\.tmp-.+)$")   # session, content-hash (older layout), temp


class UploadError(CheckpointError):
    """An uploaded file or a chosen server path that the app refuses (name, size, location)."""


# ------------------------------------------------------------------------------------------ roots

def uploads_root() -> Path:
    """Where uploads are stored: ``OPDVIZ_UPLOAD_DIR``, default ``data/uploads`` in the repository."""
    return Path(os.environ.get(UPLOAD_DIR_ENV) or REPO / "data" / "uploads").expanduser().resolve()


def checkpoint_roots() -> list[Path]:
    """Server folders the browser may pick checkpoints from: ``OPDVIZ_CHECKPOINT_ROOTS``
    (``os.pathsep``-separated; default ``data/demo`` in the repository), absolute and normalised.
    The upload folder is not among them: each session sees only its own uploads."""
    raw = os.environ.get(ROOTS_ENV)
    entries = [e for e in raw.split(os.pathsep) if e.strip()] if raw else [str(REPO / "data" / "demo")]
    roots: list[Path] = []
    for e in entries:
        p = Path(os.path.normpath(os.path.abspath(os.path.expanduser(e))))
        if p not in roots:
            roots.append(p)
    return roots


def allowed_roots() -> list[Path]:
    """Every folder the app may read checkpoints from: ``checkpoint_roots()`` plus the upload folder,
    resolved (symlinks followed). A browser session is further limited to its own upload folder."""
    roots = []
    for e in [*checkpoint_roots(), uploads_root()]:
        p = Path(e).resolve()
        if p not in roots:
            roots.append(p)
    return roots


def resolve_under_roots(path: str | Path, roots: list[Path] | None = None) -> Path:
    """``path`` resolved (symlinks and ``..`` followed) if it lies under ``roots`` (default
    ``allowed_roots()``); else UploadError. The path is first checked lexically (no file system call),
    so a path outside the roots is refused before anything is looked up; only then is it resolved and
    checked again, which refuses symlinks inside a root that lead out of it."""
    text = str(path)
    roots = allowed_roots() if roots is None else list(roots)
    if not text.strip() or any(_is_control(c) for c in text):
        raise UploadError(f"{text!r} is not a usable path (empty or with control characters)")
    if confined(text, roots) is None:
        raise UploadError(f"{text} is outside the folders this app may read "
                          f"({', '.join(map(str, roots))}); copy the checkpoint under one of them or add its "
                          f"folder to {ROOTS_ENV}")
    return Path(resolve_within(text, roots))


def list_checkpoints(root: str | Path | None = None, *, roots: list[Path] | None = None,
                     max_depth: int = 4) -> list[Path]:
    """Checkpoints under ``root`` (default: every one of ``roots``, default ``checkpoint_roots()``):
    folders holding ``model.safetensors`` or an index, and loose ``.safetensors`` files outside such
    folders. Only paths under the roots are listed (a symlink leading elsewhere is left out, and
    never looked into); hidden folders are skipped. Uploads are not listed here."""
    roots = checkpoint_roots() if roots is None else list(roots)
    tops = [resolve_under_roots(root, roots)] if root is not None else roots
    found: list[Path] = []
    for top in tops:
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
            for d in _symlinked_dirs(here, roots):  # not walked into (followlinks=False); a candidate only
                if (d / INDEX_NAME).is_file() or (d / "model.safetensors").is_file():
                    found.append(d)
    safe = []
    for p in found:
        try:
            resolve_under_roots(p, roots)
        except UploadError:
            continue
        if p not in safe:
            safe.append(p)
    return safe


def cached_models() -> dict[str, str]:
    """Models in the operator's Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME``), offered beside the allowed
    folders: {snapshot path: "org/name[@ref]"} (``opdviz.io.hub.cached_models``; empty without huggingface_hub).
    Set ``OPDVIZ_LIST_HF_CACHE=0`` to not offer them."""
    if os.environ.get("OPDVIZ_LIST_HF_CACHE", "1").strip() == "0":
        return {}
    from opdviz.io.hub import cached_models as _cached

    out: dict[str, str] = {}
    for r in sorted(_cached(), key=lambda r: r["ref"] != "main"):     # one entry per snapshot, "main" first
        out.setdefault(str(r["path"]), r["id"] + (" (LoRA adapter)" if r["kind"] == "adapter" else ""))
    return out


def _symlinked_dirs(folder: Path, roots: list[Path]) -> list[Path]:
    """Symlinks in ``folder`` that resolve to folders under ``roots`` (one leading out is never stat-ed)."""
    try:
        links = sorted(p for p in folder.iterdir() if p.is_symlink() and not p.name.startswith("."))
    except OSError:
        return []
    return [p for p in links if confined(p, roots) is not None and p.is_dir()]


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
    outside ``[A-Za-z0-9._-]`` becomes ``_``. A name longer than ``MAX_NAME`` is refused, never cut."""
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
    if len(safe) > MAX_NAME:
        # never shortened: a shard's name must stay the one its index names, and the extension says its kind
        raise UploadError(f"file name {safe[:40]}…{safe[-24:]} is {len(safe)} characters long, over the "
                          f"limit of {MAX_NAME}; rename the file (and its entry in {INDEX_NAME}) and upload "
                          "it again")
    return safe


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


def save_upload(root: str | Path, files: list[tuple[str, object]], *,
                limits: list[tuple[int, str]] | None = None) -> Path:
    """Store uploaded ``files`` (name, bytes or binary file-like) as one checkpoint folder under ``root``.

    Returns ``root/<content hash>``; the hash covers the sanitised names and every file's content, so
    the same upload twice gives the same folder and is stored once. Raises UploadError for a refused
    name or kind, repeated names, an upload over ``OPDVIZ_MAX_UPLOAD_MB`` or over any of ``limits``
    ((bytes, message) pairs: checked against the known sizes before writing and again while copying),
    or a folder that cannot be written (nothing partial is left behind)."""
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
    limits = [(limit, f"the upload is over the limit of {limit / 2**20:.0f} MB ({MAX_MB_ENV})"), *(limits or [])]
    for cap, message in limits:
        if known > cap:
            raise UploadError(message)
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
                    for cap, message in limits:
                        if total > cap:
                            raise UploadError(message)
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


# ------------------------------------------------------------------------------- sessions, quotas

def _mb_setting(env: str, default: float) -> int:
    raw = os.environ.get(env, "")
    try:
        mb = float(raw) if raw.strip() else default
    except ValueError:
        raise UploadError(f"{env}={raw!r} is not a number of megabytes") from None
    if not mb > 0 or mb == float("inf"):
        raise UploadError(f"{env}={raw!r} must be a positive number of megabytes")
    return int(mb * (1 << 20))


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 10 << 20 else f"{n / 2**20:.2g} MB"


def session_quota_bytes() -> int:
    """How much one browser session may keep uploaded at once (``OPDVIZ_UPLOAD_SESSION_MB``)."""
    return _mb_setting(SESSION_MB_ENV, DEFAULT_SESSION_MB)


def total_quota_bytes() -> int:
    """How much all sessions together may keep uploaded (``OPDVIZ_UPLOAD_TOTAL_MB``)."""
    return _mb_setting(TOTAL_MB_ENV, DEFAULT_TOTAL_MB)


def max_age_hours() -> float:
    """Hours after which a session's unused uploads are removed (``OPDVIZ_UPLOAD_MAX_AGE_H``)."""
    raw = os.environ.get(MAX_AGE_ENV, "")
    try:
        hours = float(raw) if raw.strip() else DEFAULT_MAX_AGE_H
    except ValueError:
        raise UploadError(f"{MAX_AGE_ENV}={raw!r} is not a number of hours") from None
    if not hours > 0:
        raise UploadError(f"{MAX_AGE_ENV}={raw!r} must be a positive number of hours")
    return hours


def new_session_id() -> str:
    """An unguessable id (128 random bits) for one browser session's uploads; keep it in the session only."""
    return secrets.token_hex(16)


def session_dir(session_id: str) -> Path:
    """The upload folder of one session (not created here). UploadError for anything but an id of
    ``new_session_id``'s form, so an id can never name another folder."""
    if not isinstance(session_id, str) or not _SESSION.match(session_id):
        raise UploadError("this browser session has no valid upload id; reload the page")
    return uploads_root() / session_id


def _bytes_under(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder, followlinks=False):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def save_session_upload(session_id: str, files: list[tuple[str, object]]) -> Path:
    """``save_upload`` into the session's own folder, within the per-session and total quotas (checked
    against the known sizes before anything is written, and while copying). Returns the upload folder."""
    folder = session_dir(session_id)
    used_session = _bytes_under(folder)
    used_total = _bytes_under(uploads_root())
    s_cap, t_cap = session_quota_bytes(), total_quota_bytes()
    limits = [
        (s_cap - used_session,
         f"this upload would take your uploads over {_mb(s_cap)}, the limit per browser session "
         f"({SESSION_MB_ENV}; you have {_mb(used_session)} stored): delete uploads you no longer need "
         "under Your uploads, or pick the checkpoint from a server folder"),
        (t_cap - used_total,
         f"the server's upload space is full: this upload would take all uploads over {_mb(t_cap)} "
         f"({TOTAL_MB_ENV}; {_mb(used_total)} stored); delete uploads you no longer need, try again "
         "later (unused uploads are removed after "
         f"{max_age_hours():g} h), or ask the operator to raise the limit"),
    ]
    out = save_upload(folder, files, limits=limits)
    touch_session(session_id)
    return out


@dataclass(frozen=True)
class Upload:
    """One stored upload of a session: its folder, file names, size in bytes and last change (epoch s)."""

    folder: Path
    files: tuple[str, ...]
    bytes: int
    mtime: float


def session_uploads(session_id: str) -> list[Upload]:
    """The uploads this session stored, newest first (another session's are never listed)."""
    folder = session_dir(session_id)
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for e in entries:
        if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
            continue
        p = Path(e.path)
        names = tuple(sorted(f.name for f in p.iterdir() if f.is_file()))
        out.append(Upload(p, names, _bytes_under(p), e.stat(follow_symlinks=False).st_mtime))
    return sorted(out, key=lambda u: -u.mtime)


def touch_session(session_id: str) -> None:
    """Mark the session's uploads as in use now (the age limit counts from the last use)."""
    folder = session_dir(session_id)
    try:
        os.utime(folder)
    except OSError:
        pass


def delete_upload(session_id: str, folder: str | Path, keep: tuple[str, ...] = ()) -> None:
    """Remove one of the session's own uploads. UploadError when ``folder`` is not one of them, or when
    a queued or running job still reads it (``keep``: the checkpoint paths of such jobs)."""
    mine = {str(u.folder): u for u in session_uploads(session_id)}
    target = mine.get(str(folder))
    if target is None:
        raise UploadError("that upload is not one of this session's; nothing was deleted")
    if any(lexically_under(k, [target.folder]) is not None for k in keep):
        raise UploadError(f"{', '.join(target.files)}: a queued or running analysis still reads this upload; "
                          "cancel it first (under *Analyses*) or wait for it to finish")
    shutil.rmtree(target.folder)


def sweep_uploads(max_age_h: float | None = None, keep: tuple[str, ...] = (), now: float | None = None) -> list[Path]:
    """Remove uploads not used for ``max_age_h`` hours (default ``OPDVIZ_UPLOAD_MAX_AGE_H``): session
    folders, older content-hash folders and temporary folders of interrupted uploads, judged by their
    modification time. Folders holding one of ``keep`` (paths a queued or running job reads) stay; so
    does anything in the upload folder that opdviz did not create. Returns what was removed."""
    root = uploads_root()
    cutoff = (time.time() if now is None else now) - 3600 * (max_age_hours() if max_age_h is None else max_age_h)
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for e in entries:
        if not _OURS.match(e.name) or not e.is_dir(follow_symlinks=False):
            continue
        try:
            if e.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
        except OSError:
            continue
        if any(lexically_under(k, [e.path]) is not None for k in keep):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(Path(e.path))
    return removed


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
    from opdviz.io.reader import Checkpoint

    try:
        return Checkpoint.open(path)
    except CheckpointError as exc:
        report.errors.append(str(exc))
    except OSError as exc:
        report.errors.append(f"{path}: cannot read ({exc.strerror or exc})")
    return None


def validate_checkpoint(path: str | Path) -> ValidationReport:
    """Open ``path`` with ``opdviz.io.reader.Checkpoint.open`` (headers, dtypes, shapes, offsets, index
    consistency, refusal of pickles) and summarise it. Never raises on bad input."""
    report = ValidationReport(Path(path))
    from opdviz.io.adapters import is_adapter

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
    from opdviz.io.adapters import LoraAdapter

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
    """Validate both checkpoints and plan their comparison with ``opdviz.io.reader.plan_pairs``: no common
    tensor is an error (different architectures); shape mismatches (a resized vocabulary) and missing
    tensors are warnings, listed. Never raises on bad input."""
    from opdviz.io.reader import plan_pairs

    report = PairReport(validate_checkpoint(base), validate_checkpoint(post))
    if not (report.base.ok and report.post.ok):
        return report
    b = _open(base, report)
    if b is None:
        return report
    try:
        from opdviz.io.adapters import open_post

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
