"""Small array operations of the elementwise pass, the same call on numpy views (CPU) or torch tensors (CUDA).

On CPU the elementwise passes run on numpy views of the chunk buffers (4–10× faster than torch's
elementwise ops there); on CUDA they run in torch. These helpers hide the difference.
"""

from __future__ import annotations

import numpy as np
import torch

from opdviz.errors import TensorMismatchError


def arr(t: torch.Tensor):
    """A CPU tensor's numpy view (shares memory), a CUDA tensor as is."""
    return t.numpy() if t.device.type == "cpu" else t


def count(x) -> int:
    """Number of True (nonzero) entries."""
    return int(np.count_nonzero(x)) if isinstance(x, np.ndarray) else int(torch.count_nonzero(x))


def gt(a, t, out):
    """``a > t`` into ``out``."""
    return np.greater(a, t, out=out) if isinstance(a, np.ndarray) else torch.gt(a, t, out=out)


def first_true(mask, r: int):
    """Flat positions of the first r True values of a 1-D mask."""
    if isinstance(mask, np.ndarray):
        return np.flatnonzero(mask)[:r]
    return torch.nonzero(mask).flatten()[:r]


def sumsq(x, tmp) -> float:
    """Σ x², squared into ``tmp`` (pairwise sums in x's dtype), as a float."""
    if isinstance(x, np.ndarray):
        np.square(x, out=tmp)
        return float(np.sum(tmp))
    torch.square(x, out=tmp)
    return float(tmp.sum(dtype=torch.float64))


def total(x) -> float:
    """Σ x as a float (float64 accumulation on CUDA)."""
    return float(np.sum(x)) if isinstance(x, np.ndarray) else float(x.sum(dtype=torch.float64))


def bincount(x, minlength: int) -> np.ndarray:
    """torch.bincount of a non-negative integer array, as numpy int64."""
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    return torch.bincount(t, minlength=minlength).cpu().numpy()


def floor32(t: float) -> np.float32:
    """Largest float32 ≤ t, so that ``x > floor32(t)`` in float32 equals ``x > t`` in float64."""
    f = np.float32(t)
    return np.nextafter(f, np.float32(-np.inf)) if float(f) > t else f


INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16,
           torch.float32: torch.int32, torch.float64: torch.int64}   # the integer view of each analysed float dtype


def check_pair(wb: torch.Tensor, wp: torch.Tensor) -> None:
    """Raise TensorMismatchError unless ``wb`` and ``wp`` are a pair the elementwise pass can take."""
    if wb.shape != wp.shape:
        raise TensorMismatchError(f"shape mismatch: base {tuple(wb.shape)} vs post {tuple(wp.shape)}; "
                                  "the checkpoints are not of the same architecture")
    if wb.dtype != wp.dtype:
        raise TensorMismatchError(f"dtype mismatch: base {wb.dtype} vs post {wp.dtype}; cast one checkpoint "
                                  "to the other's dtype before comparing")
    if wb.dtype not in INT_OF:
        raise TensorMismatchError(f"dtype {wb.dtype} is not analysed (bf16, fp16, fp32, fp64 only)")
    if wb.dim() not in (1, 2):
        raise TensorMismatchError(f"elementwise metrics take 1-D or 2-D tensors, got shape {tuple(wb.shape)}; "
                                  "reshape stacks to [out, in] first")
    if wb.device != wp.device:
        raise TensorMismatchError(f"base on {wb.device} but post on {wp.device}")
    if wb.numel() == 0:
        raise TensorMismatchError("empty tensor: nothing to compare")
