"""Untrusted files in a checkpoint folder: confined to the folder, bounded in size, parsed with limits.

Everything inside a checkpoint folder is untrusted (another user's folder, a download): its shards and its
JSON side files (``config.json``, ``*.index.json``, ``metrics.json``, ``adapter_config.json``).

- ``checked_file(folder, name)``: ``folder/name`` if ``name`` is a plain file name and the file is a regular
  file that is not a symlink. The one symlink followed is the Hugging Face cache's own layout,
  ``snapshots/<rev>/<file>`` → ``../../blobs/<sha>`` (a regular file directly in that repo's ``blobs``).
- ``open_checked(path)`` opens such a file again under the same rule with ``O_NOFOLLOW``, so a file swapped
  for a symlink after the check is refused too.
- ``read_json(folder, name, limits)`` reads a side file under a size cap and parses it with ``loads_json``,
  which first measures the nesting depth at C speed: ``json.loads`` recurses, and a 200k-deep file would
  end in ``RecursionError``. The same scan counts the members and values a safetensors header holds, so
  the header's cost is known before it is parsed.

The caps are operator settings (environment variables, read by ``Limits.from_env`` when a checkpoint is
opened); ``SETTINGS`` lists them with their defaults and help, and the README documents each one.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from opdviz.errors import CheckpointError, OpdvizError, OptionsError

# The safetensors format caps a header at 100 MB (MAX_HEADER_SIZE in its Rust crate); so does opdviz.
SAFETENSORS_HEADER_MB = 100
# A real header entry costs ~4-8 JSON values (dtype, shape dims, two offsets); allowing this many per
# permitted tensor bounds what json.loads may allocate for a header or side file (~60 bytes a value).
VALUES_PER_TENSOR = 32


@dataclass(frozen=True)
class Setting:
    env: str
    field: str
    default: float
    help: str


SETTINGS = (
    Setting("OPDVIZ_MAX_JSON_MB", "json_mb", 64.0,
            "Largest JSON side file read from a checkpoint folder (config.json, *.index.json, metrics.json), in MB."),
    Setting("OPDVIZ_MAX_JSON_DEPTH", "json_depth", 64,
            "Deepest nesting of arrays/objects accepted in any JSON read from a checkpoint (side files and "
            "safetensors headers)."),
    Setting("OPDVIZ_MAX_HEADER_MB", "header_mb", float(SAFETENSORS_HEADER_MB),
            "Largest safetensors header, in MB (at most 100, the format's own cap)."),
    Setting("OPDVIZ_MAX_TENSORS", "tensors", 500_000,
            f"Most tensors in one checkpoint (all shards together); a header or JSON file may also hold at most "
            f"{VALUES_PER_TENSOR} JSON values per allowed tensor. DeepSeek-V3 has ~91k tensors."),
)


@dataclass(frozen=True)
class Limits:
    """Caps on what reading one checkpoint may cost. Build with ``Limits.from_env()`` at the edge."""

    json_mb: float = 64.0
    json_depth: int = 64
    header_mb: float = float(SAFETENSORS_HEADER_MB)
    tensors: int = 500_000

    @property
    def json_bytes(self) -> int:
        return int(self.json_mb * 1_000_000)

    @property
    def header_bytes(self) -> int:
        return int(self.header_mb * 1_000_000)

    @property
    def values(self) -> int:
        return VALUES_PER_TENSOR * self.tensors

    @classmethod
    def from_env(cls, environ=None) -> "Limits":
        """The limits set in the environment (``SETTINGS``), defaults for the rest.

        Raises:
            OptionsError: a setting that is not a positive number (or a header cap above 100 MB).
        """
        environ = os.environ if environ is None else environ
        kw = {}
        for s in SETTINGS:
            text = environ.get(s.env, "").strip()
            if not text:
                continue
            integer = isinstance(s.default, int)
            try:
                value = int(text) if integer else float(text)
            except ValueError:
                value = None
            if value is None or not (0 < value < float("inf")):
                kind = "a positive integer" if integer else "a positive number"
                raise OptionsError(f"{s.env} must be {kind}, got {text!r}; unset it for the default ({s.default})")
            kw[s.field] = value
        limits = cls(**kw)
        if limits.header_mb > SAFETENSORS_HEADER_MB:
            raise OptionsError(f"OPDVIZ_MAX_HEADER_MB is {limits.header_mb:g}, above the safetensors format's cap of "
                               f"{SAFETENSORS_HEADER_MB} MB; set it to {SAFETENSORS_HEADER_MB} or less")
        return limits


# ------------------------------------------------------------------------------------------ confinement

def is_plain_name(name) -> bool:
    """True for a file name with no folder part (no ``/``, ``\\``, ``..``, NUL, not absolute)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def checked_file(folder: Path, name: str, source: Path | None = None) -> Path:
    """``folder/name`` once it is known to be a regular file of the folder itself (see the module docstring).

    Args:
        folder: the checkpoint folder (trusted: the user named it).
        name: a file name read from an untrusted place (an index) or a fixed one (``config.json``).
        source: the file that named it, for the message (default: the file itself).
    Raises:
        CheckpointError: not a plain name, missing, a symlink (other than the HF cache's), not a regular file.
    """
    folder = Path(folder)
    where = source or folder / str(name)
    if not is_plain_name(name):
        raise CheckpointError(f"{where}: file name {name!r} is not a plain file name inside {folder}; "
                              "refusing to read it (fix the index)")
    path = folder / name
    if not os.path.lexists(path):
        raise CheckpointError(f"{where}: lists {name!r} but {path} does not exist; the download is incomplete; "
                              "fetch the missing file")
    _target(path)
    return path


def open_checked(path: Path, buffering: int = -1) -> BinaryIO:
    """Open ``path`` (a file of its parent folder, as ``checked_file`` requires) for reading, refusing a
    symlink at the last step with ``O_NOFOLLOW`` and anything that is not a regular file."""
    real = _target(Path(path))
    try:
        # O_NONBLOCK: a FIFO swapped in after the check must not block the open (no effect on regular files)
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror}); it may have been replaced by a symlink or "
                              "removed; check the checkpoint folder") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path}: is not a regular file; refusing to read it")
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def _target(path: Path) -> Path:
    """The file to open for ``path``: itself when it is a regular file, the blob for an HF cache link."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if stat.S_ISREG(st.st_mode):
        return path
    if not stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"{path}: is not a regular file; refusing to read it")
    real = path.resolve()
    home = path.parent.resolve()
    # huggingface_hub stores snapshots/<rev>/<file> as a link to ../../blobs/<sha>: that layout, exactly
    blobs = home.parent.parent / "blobs" if home.parent.name == "snapshots" else None
    if blobs is None or real.parent != blobs or not real.is_file():
        place = "outside" if real.parent != home else "inside"   # the target's name is not shown: not ours
        raise CheckpointError(f"{path}: is a symlink (pointing {place} {path.parent}); refusing to follow it "
                              "(copy the file into the folder if it is intended)")
    return real


# ---------------------------------------------------------------------------------------------- JSON

@dataclass(frozen=True)
class JsonScan:
    depth: int          # deepest nesting of arrays/objects
    members: int        # objects at depth 2: the entries of a safetensors header (tensors + __metadata__)
    values: int         # roughly the number of values (separators outside strings + 1)


_KEEP = b'"[]{},'
_DELETE = bytes(b for b in range(256) if b not in _KEEP)
_CHUNK = 1 << 23


def scan_json(raw: bytes, max_depth: int | None = None) -> JsonScan:
    """Measure nesting depth, depth-2 objects and values of JSON text without parsing it.

    Escaped backslashes and quotes are removed first (a run of backslashes starts at an escape boundary
    in valid JSON, so pairing from the left is exact), then only quotes, brackets and commas are kept;
    quote parity tells which lie inside strings. Stops early once ``max_depth`` is exceeded. Exact for
    valid JSON; for invalid JSON the parser that follows reports the error.
    """
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    s = raw.translate(None, _DELETE)
    depth = deepest = parity = members = commas = 0
    for start in range(0, len(s), _CHUNK):
        a = np.frombuffer(s, np.uint8, count=min(_CHUNK, len(s) - start), offset=start)
        quote = (a == 0x22).view(np.uint8)
        inside = np.bitwise_xor.accumulate(quote) ^ parity     # 1 between an opening and a closing quote
        parity = int(inside[-1])
        out = a[(inside | quote) == 0]
        comma = out == 0x2C
        commas += int(np.count_nonzero(comma))
        out = out[~comma]
        if not out.size:
            continue
        d = np.cumsum(np.where((out == 0x5B) | (out == 0x7B), 1, -1).astype(np.int32), dtype=np.int64) + depth
        deepest, depth = max(deepest, int(d.max())), int(d[-1])
        members += int(np.count_nonzero((d == 2) & (out == 0x7B)))
        if max_depth is not None and deepest > max_depth:
            break
    return JsonScan(deepest, members, commas + 1)


def loads_json(raw: bytes, where, limits: Limits, *, error: type[OpdvizError] = CheckpointError,
               max_members: int | None = None, lenient: bool = False, object_pairs_hook=None):
    """Parse untrusted JSON text under the depth and value caps of ``limits``.

    Args:
        raw: the file's bytes (UTF-8).
        where: the file, for messages.
        max_members: also cap the objects at depth 2 (a safetensors header's tensor entries).
        lenient: return None for text that is not valid JSON (caps are still enforced).
    Raises:
        ``error`` (CheckpointError by default): over a cap, or not valid JSON (unless ``lenient``).
    """
    scan = scan_json(raw, limits.json_depth)
    if scan.depth > limits.json_depth:
        raise error(f"{where}: JSON nested deeper than {limits.json_depth} levels (OPDVIZ_MAX_JSON_DEPTH); "
                    "refusing to parse it; the file is corrupt or hostile")
    if max_members is not None and scan.members > max_members:
        raise error(f"{where}: lists {scan.members} tensor entries, more than the {max_members} allowed "
                    "(OPDVIZ_MAX_TENSORS); refusing to parse it")
    if scan.values > limits.values:
        raise error(f"{where}: holds about {scan.values} JSON values, more than the {limits.values} allowed "
                    f"({VALUES_PER_TENSOR} per tensor under OPDVIZ_MAX_TENSORS); refusing to parse it")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=object_pairs_hook)
    except RecursionError:   # only for invalid JSON the scan misread; never let it escape as a traceback
        raise error(f"{where}: JSON nested too deeply to parse; the file is corrupt or hostile") from None
    except (UnicodeDecodeError, ValueError) as exc:
        if lenient:
            return None
        raise error(f"{where}: not valid JSON ({exc}); re-download or re-save the file") from None


def read_capped(folder: Path, name: str, limits: Limits) -> bytes | None:
    """The bytes of the side file ``folder/name`` (None when absent), confined and under the JSON size cap."""
    path = Path(folder) / name
    if not os.path.lexists(path):
        return None
    path = checked_file(folder, name)
    with open_checked(path) as fh:
        raw = fh.read(limits.json_bytes + 1)
    if len(raw) > limits.json_bytes:
        raise CheckpointError(f"{path}: larger than {limits.json_mb:g} MB, the cap for a JSON file in a checkpoint "
                              "folder (OPDVIZ_MAX_JSON_MB); refusing to read it")
    return raw


def read_json(folder: Path, name: str, limits: Limits, **kw):
    """``folder/name`` parsed by ``loads_json`` (None when absent). Raises CheckpointError as they do."""
    raw = read_capped(folder, name, limits)
    return None if raw is None else loads_json(raw, Path(folder) / name, limits, **kw)
