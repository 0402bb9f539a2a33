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
from opdviz.metrics.registry import MetricInfo
from opdviz.metrics.linalg import (BaseFactors, Factors, approx_factors, base_factors, exact_factors,
                     floor_frac)
from opdviz.metrics.spectral import spectrum_metrics
from opdviz.metrics.topk_coverage import mask_code, principal_coverage_counts

_PROJ_SRC = "2511.08567"
_ANG_SRC = "2511.08567, 2606.07082"
_COV_SRC = "2606.13657"

FAMILIES: tuple[MetricInfo, ...] = (
    MetricInfo("principal_proj_{frac}", "scalar", "‖U_kᵀΔW V_k‖F²/‖ΔW‖F², U_k, V_k the top-k singular vectors of "
               "W_base, k = max(1, floor(frac·min(m, n))), frac ∈ {1, 5, 10, 20} %.", _PROJ_SRC,
               label="ΔW energy in the principal subspaces (joint)", unit="fraction", agg="matrix_mean"),
    MetricInfo("principal_proj_left_{frac}", "scalar", "‖U_kᵀΔW‖F²/‖ΔW‖F² (share in the top-k left base subspace).",
               _PROJ_SRC,
               label="ΔW energy in the left principal subspace", unit="fraction", agg="matrix_mean"),
    MetricInfo("principal_proj_right_{frac}", "scalar", "‖ΔW V_k‖F²/‖ΔW‖F² (share in the top-k right base "
               "subspace).", _PROJ_SRC,
               label="ΔW energy in the right principal subspace", unit="fraction", agg="matrix_mean"),
    MetricInfo("proj_joint_by_rank", "array", "Value i: principal_proj with k = i + 1, for every k (length "
               "min(m, n); approx: q).", _PROJ_SRC,
               label="joint projection share by rank", unit="fraction", agg="none"),
    MetricInfo("proj_left_by_rank", "array", "Value i: principal_proj_left with k = i + 1.", _PROJ_SRC,
               label="left projection share by rank", unit="fraction", agg="none"),
    MetricInfo("proj_right_by_rank", "array", "Value i: principal_proj_right with k = i + 1.", _PROJ_SRC,
               label="right projection share by rank", unit="fraction", agg="none"),
    MetricInfo("proj_joint_grid", "array", "proj_joint_by_rank at the fixed rank fractions r = k/min(m, n) = "
               "2^(−14 + i/4), i = 0…56 (linear in k between stored ranks; NaN outside 1/min(m, n) … stored "
               "length/min(m, n)): the by-rank curves on one grid for every shape.", _PROJ_SRC,
               label="joint projection share on the rank grid", unit="fraction", agg="matrix_mean"),
    MetricInfo("proj_left_grid", "array", "proj_left_by_rank on the same rank-fraction grid.", _PROJ_SRC,
               label="left projection share on the rank grid", unit="fraction", agg="matrix_mean"),
    MetricInfo("proj_right_grid", "array", "proj_right_by_rank on the same rank-fraction grid.", _PROJ_SRC,
               label="right projection share on the rank grid", unit="fraction", agg="matrix_mean"),
    MetricInfo("angle_left_mean_sin_k{k}", "scalar", "Mean sin θ of the principal angles between the top-k left "
               "singular subspaces of W_base and W_post, k ∈ {16, 64, 512} capped at min(m, n) (float64); NaN on a side "
               "whose whole space the k spans (k = m on the left, k = n on the right): R^k against itself gives 0 "
               "whatever the update, so the angle is undefined there.",
               _ANG_SRC,
               label="mean sin θ, left subspaces", unit="ratio", agg="matrix_mean"),
    MetricInfo("angle_left_max_rad_k{k}", "scalar", "Largest of those angles, radians.", _ANG_SRC,
               label="max principal angle, left", unit="radians", agg="matrix_mean"),
    MetricInfo("angle_right_mean_sin_k{k}", "scalar", "Same for the right singular subspaces.", _ANG_SRC,
               label="mean sin θ, right subspaces", unit="ratio", agg="matrix_mean"),
    MetricInfo("angle_right_max_rad_k{k}", "scalar", "Largest right principal angle, radians.", _ANG_SRC,
               label="max principal angle, right", unit="radians", agg="matrix_mean"),
    MetricInfo("angles_left_k{k}", "array", "The left principal angles, radians, ascending; length = the "
               "capped k.", _ANG_SRC,
               label="principal angles, left", unit="radians", agg="none"),
    MetricInfo("angles_right_k{k}", "array", "The right principal angles, radians, ascending.", _ANG_SRC,
               label="principal angles, right", unit="radians", agg="none"),
    MetricInfo("nss", "scalar", "Normalized spectral shift ‖σ(W_post) − σ(W_base)‖₂/‖σ(W_base)‖₂ (NaN in approx "
               "mode).", "2511.08567",
               label="normalised spectral shift", unit="ratio", agg="matrix_mean"),
    MetricInfo("base_spectrum", "array", "Singular values of W_base, descending (approx: top q).", "2511.08567",
               label="σ(W_base)", unit="weight", agg="none"),
    MetricInfo("post_spectrum", "array", "Singular values of W_post, descending (approx: top q).", "2511.08567",
               label="σ(W_post)", unit="weight", agg="none"),
    MetricInfo("principal_coverage_{alpha}", "scalar", "|M ∩ U|/|U|: U = default changed mask, M = the "
               "floor(α·numel) largest |rank-r reconstruction of W_base|, r = max(1, floor(α·min(m, n))), ties "
               "by flat index; NaN when U is empty. Random baseline = α.", _COV_SRC,
               label="principal coverage", unit="fraction", agg="changed"),
    MetricInfo("principal_coverage_exact_{alpha}", "scalar", "Same with U = exact (bitwise) changed mask.",
               _COV_SRC,
               label="principal coverage (bitwise mask)", unit="fraction", agg="changed_exact"),
    MetricInfo("principal_coverage_r{rank}_{alpha}", "scalar", "Principal coverage with the fixed reconstruction "
               "rank r = coverage_fixed_rank (capped at min(m, n)).", "2511.08567",
               label="principal coverage, fixed rank", unit="fraction", agg="changed"),
    MetricInfo("principal_coverage_r{rank}_exact_{alpha}", "scalar", "Fixed-rank principal coverage, exact mask.",
               "2511.08567",
               label="principal coverage, fixed rank (bitwise mask)", unit="fraction", agg="changed_exact"),
)


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
