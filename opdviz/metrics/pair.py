"""One tensor pair, all metrics: ``analyse_pair``, ``base_work`` and ``add_coverage`` (see ``opdviz.metrics``)."""


from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from opdviz.options import AnalysisOptions


@dataclass
class PairResult:
    scalars: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    exact: bool | None = None          # None when no spectrum was computed (vectors, stacks)
    code: torch.Tensor | None = None   # packed changed masks awaiting ``add_coverage`` (coverage=False)


@dataclass
class BaseWork:
    """Everything of one base tensor that does not depend on the post: the elementwise prepass and, for
    matrices, the base factorization. Computed once per base tensor, shared by all posts of a job."""

    stats: object                      # elementwise.BaseStats
    factors: object | None = None      # linalg.BaseFactors (matrices only)


def is_matrix_pair(wb: torch.Tensor, matrix: bool) -> bool:
    """True when the spectral/geometry pass applies: a 2-D weight. A 1×N or N×1 matrix is a matrix too: one
    singular value σ₁ = ‖ΔW‖F (stable and effective rank 1, top-k energy 1); its angles on the
    one-dimensional side are undefined (NaN, see geometry._angles)."""
    return matrix and wb.dim() == 2 and min(wb.shape) >= 1


@contextlib.contextmanager
def timed(stages: dict | None, key: str):
    """Add the seconds of the block to ``stages[key]`` (a profile; no-op when ``stages`` is None).
    On CUDA the device is synchronised first, so the time is the stage's, not its launch's."""
    if stages is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        stages[key] = stages.get(key, 0.0) + time.perf_counter() - t0


def base_work(wb: torch.Tensor, opts: AnalysisOptions, *, matrix: bool, stages: dict | None = None,
              factors=None) -> BaseWork:
    """The base-only work of ``analyse_pair`` for the base view ``wb`` (same arguments). ``factors``: the
    base factorization when already known (``opdviz.engine.basecache``), else computed."""
    from opdviz.metrics.elementwise import base_stats

    if wb.dim() == 0:       # a scalar parameter: one coordinate (as in analyse_pair)
        wb = wb.reshape(1)
    with timed(stages, "elementwise"):
        work = BaseWork(base_stats(wb, opts))
    if is_matrix_pair(wb, matrix):
        from opdviz.metrics.geometry import linalg_base

        with timed(stages, "base_decomposition"):
            work.factors = factors if factors is not None else linalg_base(wb, opts)
    return work


def analyse_pair(wb: torch.Tensor, wp: torch.Tensor, opts: AnalysisOptions, *, matrix: bool,
                 base: BaseWork | None = None, coverage: bool = True, stages: dict | None = None) -> PairResult:
    """All metrics of one pair. ``wb``/``wp``: same shape and dtype, 1-D or 2-D [out, in] views on
    the compute device. ``matrix``: also run the spectral/geometry pass (2-D weights only).
    ``base``: ``base_work(wb, …)`` when already computed for another post of this base (results are
    identical either way). ``coverage=False`` leaves the principal coverage to ``add_coverage``, which
    computes it for several posts of one base at once (the result keeps its packed masks until then).
    ``stages``: seconds by stage are added to it (``timed``)."""
    from opdviz.metrics.elementwise import elementwise_metrics

    if wb.dim() == 0:       # a scalar parameter (a learned temperature, a gate): one coordinate
        wb, wp = wb.reshape(1), wp.reshape(1)
    if base is None:
        base = base_work(wb, opts, matrix=matrix, stages=stages)
    with timed(stages, "elementwise"):
        ew = elementwise_metrics(wb, wp, opts, base.stats)
    result = PairResult(dict(ew.scalars), dict(ew.arrays))
    if is_matrix_pair(wb, matrix):
        from opdviz.metrics.geometry import coverage_code, linalg_metrics

        with timed(stages, "update_decomposition"):
            la = linalg_metrics(wb, wp, None, opts, base.factors)
        result.scalars.update(la.scalars)
        result.arrays.update(la.arrays)
        result.exact = la.exact
        result.code = coverage_code(ew.masks)
        if coverage:
            add_coverage(wb, base, [result], opts, stages)
    return result


def add_coverage(wb: torch.Tensor, base: BaseWork, results: list[PairResult], opts: AnalysisOptions,
                 stages: dict | None = None) -> None:
    """Principal coverage of several posts of the base view ``wb`` (results of ``analyse_pair(…,
    coverage=False)``), the base's reconstructions built once; fills their scalars, drops their masks."""
    todo = [r for r in results if r.code is not None]
    if not todo:
        return
    from opdviz.metrics.geometry import principal_coverage

    with timed(stages, "geometry"):
        covs = principal_coverage(wb, base.factors, [r.code for r in todo], opts)
    for r, cov in zip(todo, covs):
        r.scalars.update(cov)
        r.code = None
