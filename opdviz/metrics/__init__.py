"""Per-pair metrics: pure functions of two tensors and the options; no I/O, no SQL.

``analyse_pair`` is the one entry the job calls: the elementwise pass (sparsity criteria,
magnitudes, coverage of low-magnitude coordinates, maps) on any tensor, then — for matrices —
the linear-algebra pass (ΔW spectrum, ranks, geometry relative to the base), which reuses the
changed masks of the first pass. Definitions live in each module's ``FAMILIES`` and the README.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..options import AnalysisOptions


@dataclass
class PairResult:
    scalars: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    exact: bool | None = None          # None when no spectrum was computed (vectors, stacks)


def analyse_pair(wb: torch.Tensor, wp: torch.Tensor, opts: AnalysisOptions, *, matrix: bool) -> PairResult:
    """All metrics of one pair. ``wb``/``wp``: same shape and dtype, 1-D or 2-D [out, in] views on
    the compute device. ``matrix``: also run the spectral/geometry pass (2-D weights only)."""
    from .elementwise import elementwise_metrics

    if wb.dim() == 0:       # a scalar parameter (a learned temperature, a gate): one coordinate
        wb, wp = wb.reshape(1), wp.reshape(1)
    ew = elementwise_metrics(wb, wp, opts)
    result = PairResult(dict(ew.scalars), dict(ew.arrays))
    # a 1×N or N×1 matrix is a matrix too: one singular value σ₁ = ‖ΔW‖F (stable and effective rank 1,
    # top-k energy 1); its angles on the one-dimensional side are undefined (NaN, see geometry._angles)
    if matrix and wb.dim() == 2 and min(wb.shape) >= 1:
        from .geometry import linalg_metrics

        la = linalg_metrics(wb, wp, ew.masks, opts)
        result.scalars.update(la.scalars)
        result.arrays.update(la.arrays)
        result.exact = la.exact
    return result
