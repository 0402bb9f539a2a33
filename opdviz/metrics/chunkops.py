"""Small array operations of the elementwise pass, the same call on numpy views (CPU) or torch tensors (CUDA).

On CPU the elementwise passes run on numpy views of the chunk buffers (4–10× faster than torch's
elementwise ops there); on CUDA they run in torch. These helpers hide the difference.
"""

from __future__ import annotations

import numpy as np
import torch


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
