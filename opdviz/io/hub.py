"""Hugging Face Hub model IDs as checkpoints: ``org/name`` or ``org/name@revision`` → the local cache.

Wherever opdviz takes a checkpoint path it also takes a model ID. The ID is looked up in the local
Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ``~/.cache/huggingface/hub`` — the
places ``huggingface_hub`` itself uses) through ``huggingface_hub``, offline: nothing is downloaded
unless the caller asks (``download=True``, the CLI's ``--download``). Downloads fetch only
``*.safetensors`` and ``*.json``, the only files opdviz reads.

An existing local path always wins over an ID of the same spelling (``org/name`` as a folder in the
working directory is that folder).

The cache stores ``models--org--name/snapshots/<commit>/<file>`` as symlinks into
``models--org--name/blobs/``; ``HubSnapshot.root`` is that repository folder, the boundary inside
which the snapshot's symlinks may resolve.

    from opdviz.io.hub import resolve_checkpoint
    path = resolve_checkpoint("Qwen/Qwen2.5-0.5B")            # offline, from the cache
    path = resolve_checkpoint("me/lora@v2", download=True)    # fetch if missing
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from opdviz.errors import CheckpointError, MissingExtraError, OptionsError

HF_EXTRA_HINT = 'pip install "opdviz[hf]" (or pip install huggingface_hub)'
# files a download fetches: the only ones opdviz reads
DOWNLOAD_PATTERNS = ("*.safetensors", "*.json")
# org/name[@revision]: Hub names are letters, digits, '-', '_', '.'; revisions are branches, tags, commits
_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[\w./-]{1,200}))?$")


@dataclass(frozen=True)
class HubSnapshot:
    """A model ID resolved to a snapshot folder in the local cache."""

    repo_id: str          # "org/name"
    revision: str         # as asked ("main" when none was given)
    commit: str           # the snapshot's commit hash (its folder name)
    path: Path            # .../models--org--name/snapshots/<commit>
    root: Path            # .../models--org--name: the snapshot's files may resolve anywhere inside it


def looks_like_repo_id(spec: str) -> bool:
    """True for ``org/name`` or ``org/name@revision`` (no leading '/', '.', '~', no '..')."""
    m = _ID_RE.match(str(spec))
    return bool(m) and ".." not in spec and not m.group("repo").endswith((".", "-"))


def parse_repo_id(spec: str) -> tuple[str, str]:
    """``"org/name@rev"`` → ``("org/name", "rev")``; the revision defaults to ``"main"``."""
    m = _ID_RE.match(str(spec))
    if not m or not looks_like_repo_id(spec):
        raise OptionsError(f"{spec!r} is not a Hugging Face model ID (expected org/name or org/name@revision)")
    return m.group("repo"), m.group("rev") or "main"


def cache_dir() -> Path:
    """The Hub cache folder, read from the environment at call time, as ``huggingface_hub`` does."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expandvars(env)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def import_hub():
    """``huggingface_hub``, or a MissingExtraError that names the extra to install."""
    try:
        import huggingface_hub
    except ImportError as exc:
        raise MissingExtraError(f"model IDs need huggingface_hub, which is not installed here ({exc}); install it with "
                           f"{HF_EXTRA_HINT}, or pass a local checkpoint folder.") from None
    return huggingface_hub


def fetch_command(repo_id: str, revision: str = "main") -> str:
    rev = f" --revision {revision}" if revision != "main" else ""
    return f"hf download {repo_id}{rev} --include '*.safetensors' '*.json'"


def locate(spec: str, *, download: bool = False) -> HubSnapshot:
    """Resolve a model ID to its snapshot in the local cache (offline unless ``download``).

    Raises:
        CheckpointError: not cached (the message names the cache searched and the command that fetches it),
            or the download failed.
        OptionsError: ``spec`` is not an ID, or huggingface_hub is missing.
    """
    repo_id, revision = parse_repo_id(spec)
    hub = import_hub()
    cache = cache_dir()
    try:
        folder = hub.snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                       local_files_only=not download, allow_patterns=list(DOWNLOAD_PATTERNS))
    except Exception as exc:   # LocalEntryNotFoundError, RepositoryNotFoundError, HTTP and OS errors
        if not download:
            raise CheckpointError(
                f"{spec}: not a local path, and model {repo_id} (revision {revision}) is not in the Hugging Face "
                f"cache {cache} (nothing is downloaded unless asked); fetch it with `{fetch_command(repo_id, revision)}` "
                "or rerun with --download (API: download=True), or set HF_HUB_CACHE/HF_HOME to the cache that "
                "holds it") from None
        raise CheckpointError(f"{spec}: download of {repo_id} (revision {revision}) into {cache} failed: "
                              f"{type(exc).__name__}: {exc}") from None
    path = Path(folder)
    root = cache / f"models--{repo_id.replace('/', '--')}"
    if path.resolve().parent.parent != root.resolve():
        raise CheckpointError(f"{spec}: resolved to {path}, outside the cache folder {root}; check the cache")
    if not any(path.glob("*.safetensors")) and not (path / "adapter_config.json").is_file():
        raise CheckpointError(
            f"{spec}: the cached snapshot {path} holds no *.safetensors weights (found "
            f"{sorted(p.name for p in path.iterdir())[:8]}); opdviz reads safetensors only; fetch them with "
            f"`{fetch_command(repo_id, revision)}` or rerun with --download")
    return HubSnapshot(repo_id, revision, path.name, path, root)


def resolve_checkpoint(spec: str | os.PathLike, *, download: bool = False) -> Path:
    """A checkpoint argument → a local path: an existing path as given, else a model ID's cached snapshot.

    Args:
        spec: a file/folder path, or ``org/name`` / ``org/name@revision``.
        download: fetch a model that is not cached (``*.safetensors`` and ``*.json`` only). Never the default.
    Returns:
        The path to open with ``Checkpoint.open``.
    Raises:
        CheckpointError: neither an existing path nor a cached model (the message says what to run).
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = os.fspath(spec)
    if looks_like_repo_id(text):
        try:
            return locate(text, download=download).path
        except MissingExtraError:      # most likely a mistyped path: say both
            raise CheckpointError(f"{path}: no such file or folder; check the checkpoint path (to read it as a "
                                  f"Hugging Face model ID instead, {HF_EXTRA_HINT})") from None
    raise CheckpointError(f"{path}: no such file or folder; check the checkpoint path (or give a Hugging Face "
                          "model ID as org/name[@revision])")


def allowed_root(path: Path) -> Path:
    """The folder inside which ``path``'s files may resolve: the repository folder for a cache snapshot
    (``…/models--org--name/snapshots/<commit>`` → ``…/models--org--name``), else the folder itself."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def cached_models(cache: Path | None = None) -> list[dict]:
    """Models in the local cache that hold safetensors weights or a PEFT adapter, one row per revision ref.

    Rows: {"id": "org/name" or "org/name@ref", "repo_id", "ref", "commit", "path", "kind": "model"|"adapter"}.
    Reads only the cache's folder layout (no network); [] when huggingface_hub or the cache is absent."""
    try:
        hub = import_hub()
    except OptionsError:
        return []
    cache = Path(cache) if cache is not None else cache_dir()
    if not cache.is_dir():
        return []
    try:
        info = hub.scan_cache_dir(str(cache))
    except Exception:   # a cache that cannot be scanned lists nothing (the picker still shows folders)
        return []
    rows = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            snap = Path(rev.snapshot_path)
            kind = "adapter" if (snap / "adapter_config.json").is_file() else "model"
            if kind == "model" and not any(snap.glob("*.safetensors")):
                continue
            refs = sorted(rev.refs) or [rev.commit_hash]
            for ref in refs:
                rid = repo.repo_id if ref == "main" else f"{repo.repo_id}@{ref}"
                rows.append({"id": rid, "repo_id": repo.repo_id, "ref": ref, "commit": rev.commit_hash,
                             "path": snap, "kind": kind})
    return rows


def add_download_flag(parser) -> None:
    """``--download``: the CLI's one way to let a model ID be fetched."""
    parser.add_argument("--download", action="store_true",
                        help="fetch model IDs (org/name[@rev]) missing from the Hugging Face cache (*.safetensors "
                             "and *.json only); without it, IDs resolve offline from the cache")


def prefetch(specs, download: bool) -> None:
    """With ``download``: fetch every model ID among ``specs`` that is not a local path (CLI edge)."""
    if not download:
        return
    for s in specs:
        if s is not None and not Path(s).expanduser().exists() and looks_like_repo_id(str(s)):
            locate(str(s), download=True)
