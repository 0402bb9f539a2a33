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
from opdviz.metrics.linalg import (MetricInfo, BaseFactors, Factors, approx_factors, base_factors, chunk_rows, exact_factors,
                     floor_frac)
from opdviz.metrics.spectral import spectrum_metrics

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
    return _principal_coverage(w_b, base.v, codes, transposed, min(wb.shape), opts)


def coverage_code(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """One post's changed masks packed for ``principal_coverage``: uint8 in working orientation, bit 1 =
    default mask, bit 0 = exact mask (1 byte per coordinate, kept while the other posts are computed)."""
    md = masks["default"]
    transposed = md.shape[0] < md.shape[1]
    return _mask_code(masks, transposed, *((md.shape[1], md.shape[0]) if transposed else md.shape))


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


# ---------------------------------------------------------------- principal coverage

_BUCKETS = 1 << 15            # |R| float32 bit patterns >> 16: sign dropped, 8 exponent + 7 mantissa bits


def _principal_coverage(w_b: torch.Tensor, base_v: torch.Tensor, codes: list[torch.Tensor],
                        transposed: bool, mn: int, opts: AnalysisOptions) -> list[dict[str, float]]:
    m, n = w_b.shape
    numel = m * n
    plan: dict[int, list[tuple[str, str, int]]] = {}     # rank → [(name default, name exact, K)]
    nan_names: list[str] = []
    avail = base_v.shape[1]
    for a in opts.coverage_alphas:
        K, lab = floor_frac(a, numel), fmt_pct(a)
        fixed = opts.coverage_fixed_rank
        for r, d_name, e_name in ((max(1, floor_frac(a, mn)), f"principal_coverage_{lab}",
                                   f"principal_coverage_exact_{lab}"),
                                  (min(fixed, mn), f"principal_coverage_r{fixed}_{lab}",
                                   f"principal_coverage_r{fixed}_exact_{lab}")):
            if r > avail:
                nan_names += [d_name, e_name]
            else:
                plan.setdefault(r, []).append((d_name, e_name, K))
    outs = [{name: float("nan") for name in nan_names} for _ in codes]
    if not plan or not codes:
        return outs
    select = _topk_mask_counts_sorted if numel <= SMALL_SELECT else _topk_mask_counts
    for out, (counts, tot_d, tot_e) in zip(outs, select(w_b, base_v, plan, codes, transposed)):
        for (d_name, e_name), (c_d, c_e) in counts.items():
            out[d_name] = c_d / tot_d if tot_d else float("nan")
            out[e_name] = c_e / tot_e if tot_e else float("nan")
    return outs


def _mask_code(masks: dict[str, torch.Tensor], transposed: bool, m: int, n: int) -> torch.Tensor:
    """uint8 m×n in working orientation: bit 1 = default mask, bit 0 = exact mask."""
    md, me = masks["default"], masks["exact"]
    if transposed:
        md, me = md.T, me.T
    code = torch.empty(m, n, dtype=torch.uint8, device=md.device)
    code.copy_(md)
    code.mul_(2)
    code.add_(me)
    return code


SMALL_SELECT = 1 << 15        # below this many entries a stable sort beats the histogram's fixed cost


def _topk_mask_counts_sorted(w: torch.Tensor, v: torch.Tensor, plan: dict[int, list[tuple[str, str, int]]],
                             codes: list[torch.Tensor], transposed: bool):
    """Small-matrix twin of ``_topk_mask_counts`` (same results, same tie rule): a stable sort of
    -|R| in the original [out, in] flat order per rank, then prefix counts of each code's mask bits."""
    wf = w.to(torch.float32)
    R = torch.zeros(wf.shape, dtype=torch.float32, device=w.device)
    codes_o = [(code.T if transposed else code).reshape(-1).to(torch.int64) for code in codes]
    totals = [(int(((c & 2) > 0).sum()), int((c & 1).sum())) for c in codes_o]
    results: list[dict[tuple[str, str], tuple[int, int]]] = [{} for _ in codes]
    prev_r = 0
    for r in sorted(plan):
        vs = v[:, prev_r:r].to(torch.float32)
        R.addmm_(wf @ vs, vs.T)
        prev_r = r
        a = (R.T if transposed else R).reshape(-1).abs().neg()
        order = torch.sort(a, stable=True).indices
        for res, code_o in zip(results, codes_o):
            c = code_o[order]
            cd, ce = ((c & 2) > 0).cumsum(0), (c & 1).cumsum(0)
            for d_name, e_name, K in plan[r]:
                K = min(K, c.numel())
                res[(d_name, e_name)] = (int(cd[K - 1]), int(ce[K - 1])) if K > 0 else (0, 0)
    return [(res, t[0], t[1]) for res, t in zip(results, totals)]


def _topk_mask_counts(w: torch.Tensor, v: torch.Tensor, plan: dict[int, list[tuple[str, str, int]]],
                      codes: list[torch.Tensor], transposed: bool):
    """For each rank r in ``plan`` and each K there: how many of the K largest |W V_r V_rᵀ| entries
    (ties → smaller original flat index first, like numpy argsort(-x, kind="stable")) lie in the
    default and in the exact mask of each code. Returns, per code, ({(d_name, e_name): (count_d,
    count_e)}, |U_d|, |U_e|).

    The selection depends on the base only, so the posts of one base share it: one float32
    reconstruction buffer R is grown in place over increasing r (R += (W V_j) V_jᵀ), never an m×n
    float64. Selection is exact on the float32 values in two fused sweeps per rank: a histogram of
    (|R| bits >> 16, mask code) per code while R is built, then — in the next rank's sweep, before R
    changes — the members of the one bucket holding the K-th value are gathered (with every code's
    bits) and resolved on their low 16 bits and flat indices."""
    m, n = w.shape
    dev = w.device
    rows = min(m, max(16, chunk_rows(n, dev) // 4))   # small chunks: temporaries stay cache-sized
    numel = m * n
    P = len(codes)
    R = torch.zeros(m, n, dtype=torch.float32, device=dev)
    wbuf = torch.empty(rows, n, dtype=torch.float32, device=dev)
    ib = torch.empty(rows, n, dtype=torch.int32, device=dev)
    ic = torch.empty(rows, n, dtype=torch.int32, device=dev) if P > 1 else None
    ranks = sorted(plan)
    results: list[dict[tuple[str, str], tuple[int, int]]] = [{} for _ in codes]
    totals: list[tuple[int, int]] | None = None
    pending: list[dict] = []           # targets of the previous rank awaiting their bucket members
    prev_r = 0
    for r in ranks + [None]:
        vs = v[:, prev_r:r].to(torch.float32) if r is not None else None
        hists = [torch.zeros(_BUCKETS * 4, dtype=torch.int64, device=dev) for _ in codes] if r is not None else []
        buckets = sorted({t["bucket"] for t in pending if t["bucket"] is not None})
        members: dict[int, list[tuple]] = {b: [] for b in buckets}
        for i in range(0, m, rows):
            c = min(rows, m - i)
            rc, kb = R[i:i + c], ib[:c]
            ccs = [code[i:i + c] for code in codes]
            bits = rc.view(torch.int32)
            if buckets:
                torch.bitwise_right_shift(bits, 16, out=kb)
                kb.bitwise_and_(0x7FFF)
                for b in buckets:
                    idx = (kb == b).view(-1).nonzero().squeeze(1)
                    if idx.numel():
                        members[b].append((bits.view(-1)[idx] & 0xFFFF, [cc.view(-1)[idx] for cc in ccs],
                                           idx + i * n))
            if r is not None:
                wc = wbuf[:c]
                wc.copy_(w[i:i + c])
                rc.addmm_(wc @ vs, vs.T)
                torch.bitwise_right_shift(bits, 14, out=kb)
                kb.bitwise_and_(0x1FFFC)          # bucket·4; the sign bit (→ |R|) and low bits dropped
                if P == 1:
                    kb.bitwise_or_(ccs[0])
                    hists[0] += torch.bincount(kb.view(-1), minlength=_BUCKETS * 4)
                else:
                    kc = ic[:c]
                    for hist, cc in zip(hists, ccs):
                        torch.bitwise_or(kb, cc, out=kc)
                        hist += torch.bincount(kc.view(-1), minlength=_BUCKETS * 4)
        for t in pending:
            mem = members.get(t["bucket"], [])
            for p in range(P):
                results[p][t["names"]] = _resolve(t, p, mem, transposed, m, n)
        pending = []
        if r is None:
            break
        hs = [hist.view(_BUCKETS, 4) for hist in hists]
        if totals is None:
            totals = []
            for h in hs:
                per_code = h.sum(0)
                totals.append((int(per_code[2] + per_code[3]), int(per_code[1] + per_code[3])))
        tot = hs[0].sum(1)                            # elements per bucket: the same for every code
        ge = tot.flip(0).cumsum(0).flip(0)            # elements in buckets ≥ b
        hges = [h.flip(0).cumsum(0).flip(0) for h in hs]
        for d_name, e_name, K in plan[r]:
            t = {"names": (d_name, e_name), "K": K, "bucket": None}
            if K <= 0:
                t["fixed"] = [(0, 0)] * P
            elif K >= numel:
                t["fixed"] = list(totals)
            else:
                b = int((ge >= K).sum()) - 1
                aboves = [hge[b] - h[b] for hge, h in zip(hges, hs)]
                t.update(bucket=b, need=K - int(ge[b] - tot[b]),
                         above=[(int(a[2] + a[3]), int(a[1] + a[3])) for a in aboves])
            pending.append(t)
        prev_r = r
    return [(res, t[0], t[1]) for res, t in zip(results, totals)]


def _resolve(t: dict, p: int, members, transposed: bool, m: int, n: int) -> tuple[int, int]:
    """Finish one K for code ``p``: pick the ``need`` largest members of the threshold bucket (ties by
    flat index) and count that code's mask bits among them."""
    if t["bucket"] is None:
        return t["fixed"][p]
    low = torch.cat([x[0] for x in members]).long()
    codes = torch.cat([x[1][p] for x in members]).long()
    widx = torch.cat([x[2] for x in members])
    need = t["need"]
    cnt = torch.bincount(low, minlength=1 << 16)
    ge = cnt.flip(0).cumsum(0).flip(0)
    lstar = int((ge >= need).sum()) - 1
    sel = low > lstar
    take = need - int(sel.sum())
    ties = (low == lstar).nonzero().squeeze(1)
    if take < ties.numel():
        wi, wj = widx[ties] // n, widx[ties] % n
        flat = wj * m + wi if transposed else widx[ties]     # order of the original [out, in] layout
        ties = ties[torch.argsort(flat)[:take]]
    chosen = torch.cat([codes[sel], codes[ties]])
    above = t["above"][p]
    return (above[0] + int(((chosen & 2) > 0).sum()), above[1] + int((chosen & 1).sum()))
