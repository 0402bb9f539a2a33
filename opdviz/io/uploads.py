"""Checkpoints uploaded in the browser: saved privately per session, within quotas, swept when unused.

Uploads are private to a browser session: ``save_session_upload(session_id, files)`` stores them in
``<upload dir>/<session id>/<content hash>/`` (``new_session_id()`` is unguessable and kept in the
session only; the same files uploaded twice by one session are stored once), with sanitised names,
written to a temporary folder and renamed into place so a half-written upload is never visible, after
checking the per-upload, per-session and total quotas (``OPDVIZ_MAX_UPLOAD_MB``,
``OPDVIZ_UPLOAD_SESSION_MB``, ``OPDVIZ_UPLOAD_TOTAL_MB``). ``session_uploads`` lists a session's own
uploads, ``delete_upload`` removes one, ``sweep_uploads`` removes those not used for
``OPDVIZ_UPLOAD_MAX_AGE_H`` hours (the New analysis page and a starting job worker call it). ``checkpoint_in(folder)`` says what to open in such a folder.

Server folders are confined by ``opdviz.io.folders``; uploads and folders are checked by ``opdviz.io.validation``.
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
from dataclasses import dataclass
from pathlib import Path

from opdviz.errors import CheckpointError
from opdviz.io.roots import lexically_under

REPO = Path(__file__).resolve().parents[2]          # the repository (this file is opdviz/io/...)
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


# ---------------------------------------------------------------------------------------- storage

def uploads_root() -> Path:
    """Where uploads are stored: ``OPDVIZ_UPLOAD_DIR``, default ``data/uploads`` in the repository."""
    return Path(os.environ.get(UPLOAD_DIR_ENV) or REPO / "data" / "uploads").expanduser().resolve()


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
    if any(is_control(c) for c in name):
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


def is_control(c: str) -> bool:
    """True for control, format and line/paragraph separator characters (refused in names and paths)."""
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


