"""Pickled PyTorch checkpoints (``.bin``/``.pt``): recognised, and read only when the user allows it.

Unpickling can run code, so ``opdviz.io.reader`` refuses these files unless ``allow_pickle=True``; even
then they are loaded with ``torch.load(weights_only=True, mmap=True)`` (no arbitrary globals), and their
tensors are described as ``TensorInfo`` like a safetensors header's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opdviz.errors import CheckpointError
from opdviz.io.headers import TensorInfo
from opdviz.io.safefiles import open_checked

_TORCH_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def looks_pickled(path: Path) -> bool:
    """torch.save writes a zip archive (since 1.6) or a bare pickle (protocol 2+ starts with 0x80)."""
    with open_checked(path) as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only (no arbitrary code); mmap keeps the file out of RAM when it is a zip."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as e:  # UnpicklingError for disallowed globals, zip/EOF errors for broken files
        raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {e}; "
                              "convert it to safetensors with a trusted script") from e
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):  # training checkpoints nest the weights
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def pickle_infos(path: Path) -> dict[str, TensorInfo]:
    infos = {}
    for pos, (name, t) in enumerate(torch_load(path).items()):
        if t.dtype not in _TORCH_TO_ST:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        infos[name] = TensorInfo(name, tuple(t.shape), _TORCH_TO_ST[t.dtype], path,
                                 t.numel() * t.element_size(), pos)
    return infos
