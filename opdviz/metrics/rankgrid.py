"""The fixed rank-fraction grid of the ``proj_*_grid`` arrays (torch-free: the dashboard imports it).

A by-rank curve (value i at k = i + 1, e.g. ``proj_joint_by_rank``) has one value per rank of its
matrix, so curves of different shapes share no x values and a mean over 200 matrices would need all
their full arrays. The engine also stores each curve at r = k / min(m, n) = 2^(−14 + i/4), i = 0…56,
which the Geometry page averages directly.
"""

from __future__ import annotations

import numpy as np

# rank fractions r = k / min(m, n): quarter octaves from 2^-14 to 1 (57 values)
PROJ_GRID = 2.0 ** (-14 + np.arange(57) / 4)


def rank_grid(by_rank, mn: int) -> np.ndarray:
    """A by-rank curve at the rank fractions ``PROJ_GRID``, linear in k between stored ranks; NaN below
    k = 1 and above the stored length (an approximate spectrum stores only the top q)."""
    v = np.asarray(by_rank, dtype=np.float64)
    if not len(v):
        return np.full(len(PROJ_GRID), np.nan)
    return np.interp(PROJ_GRID, np.arange(1, len(v) + 1) / mn, v, left=np.nan, right=np.nan)
