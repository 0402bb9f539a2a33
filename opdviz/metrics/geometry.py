"""Geometry of ΔW relative to the base, and the linear-algebra entry point ``linalg_metrics``.

Principal projection, principal angles, normalized spectral shift and principal coverage, all from
the one factorization pass of ``opdviz.metrics.linalg`` (never decomposing a matrix twice), plus
the ΔW spectrum of ``opdviz.metrics.spectral``. Wide matrices are analysed transposed (all the
heavy work on the smaller side) and their left/right outputs swapped back.

Rank-deficient matrices: directions with σ ≤ 1e-6·σ₁ are null. Left projections onto more base
directions than that rank are NaN (u_i undefined), and angles at a k above the rank of W_base or
W_post are NaN (the top-k subspace is not defined). Approx mode (randomized top-q): projections and
angles for k > q, NSS and principal coverage with r > q are NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from opdviz.errors import TensorMismatchError
from opdviz.options import AnalysisOptions, fmt_pct
from opdviz.metrics.rankgrid import rank_grid
from opdviz.metrics.linalg import (BaseFactors, Factors, approx_factors, base_factors, exact_factors,
                     floor_frac)
from opdviz.metrics.spectral import spectrum_metrics
from opdviz.metrics.topk_coverage import mask_code, principal_coverage_counts




@dataclass
class LinalgResult:
    scalars: dict[str, float]
    arrays: dict[str, np.ndarray]      # float64 numpy
    exact: bool                        # False when randomized top-k was used


def _check(wb: torch.Tensor, wp: torch.Tensor) -> None:
    if wb.dim() != 2 or wb.shape != wp.shape:
        raise TensorMismatchError(f"linalg_metrics needs two 2-D tensors of one shape, got "
                                  f"{tuple(wb.shape)} and {tuple(wp.shape)}")


def _is_exact(wb: torch.Tensor, opts: AnalysisOptions) -> bool:
    mn = min(wb.shape)
    return opts.spectrum == "exact" or (
        opts.spectrum == "auto" and not (wb.device.type == "cpu" and mn > opts.exact_max_dim))


def _working(wb: torch.Tensor) -> tuple[torch.Tensor, bool]:
    transposed = wb.shape[0] < wb.shape[1]
    return (wb.T if transposed else wb), transposed


def linalg_base(wb: torch.Tensor, opts: AnalysisOptions) -> BaseFactors:
    """The base-only factorization of one 2-D base matrix [out, in] (working orientation), computed once
    and passed as ``base`` to ``linalg_metrics`` / ``principal_coverage`` for every post of that base."""
    _check(wb, wb)
    w_b, _ = _working(wb)
    mn = min(wb.shape)
    return base_factors(w_b, _is_exact(wb, opts), min(opts.approx_rank, mn), opts.seed)


def linalg_metrics(wb: torch.Tensor, wp: torch.Tensor, masks: dict[str, torch.Tensor] | None,
                   opts: AnalysisOptions, base: BaseFactors | None = None) -> LinalgResult:
    """Spectrum and geometry metrics of one 2-D pair [out, in], computed on ``wb``'s device.

    ``masks``: bool changed masks of the same shape, keys "default" and "exact"; None leaves the
    principal coverage out (``principal_coverage`` computes it for several posts of one base at once).
    ``base``: ``linalg_base(wb, opts)`` when already computed (results are identical either way).
    Spectra are exact unless ``opts.spectrum`` is "approx", or "auto" on CPU with min(m, n) >
    ``opts.exact_max_dim``."""
    _check(wb, wp)
    rows, cols = wb.shape
    w_b, transposed = _working(wb)
    w_p = wp.T if transposed else wp
    mn = min(rows, cols)
    exact = _is_exact(wb, opts)
    base = base if base is not None else linalg_base(wb, opts)
    ks = sorted({min(k, mn) for k in opts.angle_ks})
    q = min(opts.approx_rank, mn)
    f = exact_factors(w_b, w_p, ks, base) if exact else approx_factors(w_b, w_p, ks, q, opts.seed, base)

    scalars = spectrum_metrics(f.delta_sigma, f.delta_fro2, rows, cols, exact)
    arrays = {"spectrum": f.delta_sigma, "base_spectrum": f.base_sigma, "post_spectrum": f.post_sigma}
    _projections(f, transposed, mn, opts, scalars, arrays)
    _angles(f, transposed, tuple(w_b.shape), opts, scalars, arrays)
    if exact and f.base_sigma.any():
        scalars["nss"] = float(np.linalg.norm(f.post_sigma - f.base_sigma) / np.linalg.norm(f.base_sigma))
    else:
        scalars["nss"] = float("nan")
    if masks is not None:
        scalars.update(principal_coverage(wb, base, [coverage_code(masks)], opts)[0])
    return LinalgResult(scalars, {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}, exact)


def principal_coverage(wb: torch.Tensor, base: BaseFactors, codes: list[torch.Tensor],
                       opts: AnalysisOptions) -> list[dict[str, float]]:
    """The principal-coverage scalars of several posts of one base matrix ``wb`` [out, in]: the rank-r
    reconstructions of W_base and their top-K selections are built once, each post's changed masks
    (``coverage_code``) are counted in the same sweeps. Returns one dict per entry of ``codes``."""
    w_b, transposed = _working(wb)
    return principal_coverage_counts(w_b, base.v, codes, transposed, min(wb.shape), opts)


def coverage_code(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """One post's changed masks packed for ``principal_coverage``: uint8 in working orientation, bit 1 =
    default mask, bit 0 = exact mask (1 byte per coordinate, kept while the other posts are computed)."""
    md = masks["default"]
    transposed = md.shape[0] < md.shape[1]
    return mask_code(masks, transposed, *((md.shape[1], md.shape[0]) if transposed else md.shape))


def _projections(f: Factors, transposed: bool, mn: int, opts: AnalysisOptions, scalars, arrays) -> None:
    fro2 = f.delta_fro2
    left, right = (f.proj_right_cum, f.proj_left_cum) if transposed else (f.proj_left_cum, f.proj_right_cum)
    with np.errstate(invalid="ignore", divide="ignore"):
        by_rank = {name: (cum / fro2 if fro2 > 0 else np.full_like(cum, np.nan))
                   for name, cum in (("joint", f.proj_joint_cum), ("left", left), ("right", right))}
    for name, v in by_rank.items():
        arrays[f"proj_{name}_by_rank"] = v
        arrays[f"proj_{name}_grid"] = rank_grid(v, mn)
    for frac in opts.proj_fracs:
        k = max(1, floor_frac(frac, mn))
        for name, suffix in (("joint", ""), ("left", "_left"), ("right", "_right")):
            v = by_rank[name]
            scalars[f"principal_proj{suffix}_{fmt_pct(frac)}"] = float(v[k - 1]) if k <= len(v) else float("nan")


def _angles(f: Factors, transposed: bool, shape: tuple[int, int], opts: AnalysisOptions, scalars, arrays) -> None:
    """Principal angles per side and k. ``shape``: (m, n) in working orientation (m ≥ n). A k that
    spans a side's whole space (k ≥ n on the right, k ≥ m on the left) compares R^n with itself: every
    angle is 0 whatever the update, so those angles are undefined and stored as NaN."""
    m, n = shape
    mn = min(m, n)
    for k in opts.angle_ks:
        kc = min(k, mn)
        sides = {"left": (f.sin2_left[kc], kc >= m), "right": (f.sin2_right[kc], kc >= n)}
        if transposed:
            sides = {"left": sides["right"], "right": sides["left"]}
        for side, (sin2, full) in sides.items():
            if sin2 is None or full:
                theta = np.full(kc, np.nan)
                scalars[f"angle_{side}_mean_sin_k{k}"] = scalars[f"angle_{side}_max_rad_k{k}"] = float("nan")
            else:
                s = np.sqrt(np.clip(sin2, 0.0, 1.0))
                theta = np.arcsin(s)       # sin² from complement Grams: accurate for tiny angles
                scalars[f"angle_{side}_mean_sin_k{k}"] = float(s.mean())
                scalars[f"angle_{side}_max_rad_k{k}"] = float(theta.max())
            arrays[f"angles_{side}_k{k}"] = theta
