"""Safetensors headers: parse and check one file's header before any tensor is read.

``read_header(path, limits, budget)`` reads the 8-byte length and the JSON header of a ``.safetensors``
file and checks everything a broken download can get wrong (length, JSON, dtypes, shapes, offsets that
must tile the data section, file size), so ``opdviz.io.reader.Checkpoint.open`` fails at once with a
message naming the file. JSON is parsed under the size, depth and member caps of
``opdviz.io.safefiles.Limits``. ``TensorInfo`` is what a header says about one tensor (no data loaded).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from opdviz.errors import CheckpointError
from opdviz.io.safefiles import Limits, loads_json, open_checked

# The safetensors library refuses headers above this size (MAX_HEADER_SIZE in its Rust code); an operator
# may lower opdviz's cap with OPDVIZ_MAX_HEADER_MB (opdviz.io.safefiles).
MAX_HEADER_BYTES = 100_000_000

# Bits per element of every dtype the safetensors format defines (F4/F6 are packed sub-byte types).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32", "F64"})


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is, read from the header (no data loaded)."""

    name: str                # name as stored in the file
    shape: tuple[int, ...]
    dtype: str               # safetensors dtype string ("BF16", "F32", "I64", "F8_E4M3", ...)
    file: Path               # the file (shard) it lives in
    nbytes: int
    offset: int              # data offset in the file (pickled checkpoints: position in the file's dict)

    @property
    def is_float(self) -> bool:
        """True for BF16/F16/F32/F64, the dtypes ΔW is analysed in (8-bit floats are quantized: no)."""
        return self.dtype in FLOAT_DTYPES

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path, limits: Limits, budget: int) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header holding at most ``budget`` tensors; return its tensors keyed by
    name (unordered). The header's size, nesting and entry count are checked before it is parsed."""
    with open_checked(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too small to be safetensors (needs an 8-byte "
                                  "header length); re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, limits.header_bytes):
            cap = ("the safetensors cap of 100 MB" if limits.header_bytes >= MAX_HEADER_BYTES
                   else f"the cap of {limits.header_mb:g} MB set by OPDVIZ_MAX_HEADER_MB")
            raise CheckpointError(f"{path}: header length {n} bytes exceeds {cap}; the file is corrupt or not "
                                  "safetensors")
        if 8 + n > size:
            raise CheckpointError(f"{path}: file is {size} bytes but its header needs {8 + n}; the file is "
                                  "truncated or not safetensors; re-download or re-save it")
        raw = f.read(n)
    header = loads_json(raw, f"{path}: corrupt safetensors header", limits, max_members=max(budget, 0) + 1,
                        object_pairs_hook=_no_duplicate_keys)          # + 1: the __metadata__ entry
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (JSON is not an object)")
    header.pop("__metadata__", None)
    if len(header) > budget:
        raise CheckpointError(f"{path}: the header lists more tensors than the {limits.tensors} allowed per "
                              "checkpoint (OPDVIZ_MAX_TENSORS); refusing to open it")

    infos = {}
    for name, entry in header.items():
        infos[name] = _entry_info(path, name, entry, data_start=8 + n)
    # Tensor data must tile the data section exactly: sorted by offset, each starts where the last ended.
    end = 0
    for info in sorted(infos.values(), key=lambda i: (i.offset, i.nbytes)):
        begin = info.offset - (8 + n)
        if begin != end:
            what = "overlaps the previous tensor" if begin < end else f"leaves a gap of {begin - end} bytes"
            raise CheckpointError(f"{path}: corrupt header: tensor {info.name!r} at data offset {begin} {what} "
                                  f"(previous tensor ends at {end}); re-download or re-save the file")
        end = begin + info.nbytes
    need = 8 + n + end
    if size < need:
        raise CheckpointError(f"{path}: file is {size} bytes but its header needs {need}; the file is "
                              "truncated (incomplete download?); re-download or re-save it")
    if size > need:
        raise CheckpointError(f"{path}: file is {size} bytes but its header accounts for only {need}; "
                              "the file is corrupt; re-download or re-save it")
    return infos


def _no_duplicate_keys(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))   # linear: headers can be huge
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _entry_info(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: corrupt header entry (not an object)")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)}); "
                              "the file is corrupt or from a newer safetensors; try upgrading safetensors")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: corrupt header: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int and o >= 0 for o in offs)
            and offs[0] <= offs[1]):
        raise CheckpointError(f"{where}: corrupt header: data_offsets {offs!r} is not [begin, end] with "
                              "0 <= begin <= end")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offs[1] - offs[0]:
        raise CheckpointError(f"{where}: corrupt header: shape {tuple(shape)} × {dtype} is {bits / 8:g} bytes "
                              f"but data_offsets span {offs[1] - offs[0]}; re-download or re-save the file")
    return TensorInfo(name, tuple(shape), dtype, path, offs[1] - offs[0], data_start + offs[0])


def stored_order(infos: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    return dict(sorted(infos.items(), key=lambda kv: (kv[1].offset, kv[0])))
