"""Server folders the browser may pick checkpoints from, confined to the operator's roots.

Server-side folders are confined to ``checkpoint_roots()`` (``OPDVIZ_CHECKPOINT_ROOTS``,
``os.pathsep``-separated; default ``data/demo`` under the repository); ``resolve_under_roots`` checks a
path lexically against the roots before touching the file system, then refuses anything that resolves
outside them (symlinks and ``..`` included). ``list_checkpoints`` offers what lies under the roots and
``cached_models`` what the operator's Hugging Face cache holds. Uploads are not listed here: each browser
session sees only its own (``opdviz.io.uploads``).

    path = resolve_under_roots("data/demo/base")
"""

from __future__ import annotations

import os
from pathlib import Path

from opdviz.io.roots import confined, resolve_within
from opdviz.io.uploads import INDEX_NAME, REPO, UploadError, is_control, uploads_root

ROOTS_ENV = "OPDVIZ_CHECKPOINT_ROOTS"


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
    if not text.strip() or any(is_control(c) for c in text):
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
