"""Geometry metrics (principal projection, principal angles, NSS, principal coverage) against
independent float64 references: np.linalg.svd, scipy.linalg.subspace_angles, numpy stable argsort."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg as sl
import torch

from opdviz.metrics import linalg
from opdviz.metrics.families import GEOMETRY as FAMILIES
from opdviz.metrics.geometry import linalg_metrics
from opdviz.options import AnalysisOptions


def _masks(wb, wp):
    d = wp.float() - wb.float()
    return {"default": d.abs() > 1e-2, "exact": wp != wb}


def _pair(shape, dtype, seed=0, scale=3e-2, density=0.3):
    g = torch.Generator().manual_seed(seed)
    wb = torch.randn(*shape, generator=g)
    upd = torch.randn(*shape, generator=g) * scale * (torch.rand(*shape, generator=g) < density)
    return wb.to(dtype), (wb + upd).to(dtype)


def _np(t):
    return t.float().double().numpy()


def _angles(a, b):
    return np.sort(sl.subspace_angles(a, b))


def _ref_geometry(B, P, fracs=(0.01, 0.05, 0.10, 0.20), ks=(16, 64, 512)):
    D = P - B
    mn = min(B.shape)
    fro2 = (D ** 2).sum()
    Ub, sb, Vbt = np.linalg.svd(B, full_matrices=False)
    Up, sp, Vpt = np.linalg.svd(P, full_matrices=False)
    out, arrays = {}, {}
    for f, lab in zip(fracs, ("1pct", "5pct", "10pct", "20pct")):
        k = max(1, math.floor(f * mn))
        out[f"principal_proj_{lab}"] = ((Ub[:, :k].T @ D @ Vbt[:k].T) ** 2).sum() / fro2
        out[f"principal_proj_left_{lab}"] = ((Ub[:, :k].T @ D) ** 2).sum() / fro2
        out[f"principal_proj_right_{lab}"] = ((D @ Vbt[:k].T) ** 2).sum() / fro2
    for k in ks:
        kc = min(k, mn)
        arrays[f"angles_left_k{k}"] = _angles(Ub[:, :kc], Up[:, :kc])
        arrays[f"angles_right_k{k}"] = _angles(Vbt[:kc].T, Vpt[:kc].T)
        # a k that spans the side's whole space (R^m on the left, R^n on the right) has no angle to measure
        for side, dim in (("left", B.shape[0]), ("right", B.shape[1])):
            if kc >= dim:
                arrays[f"angles_{side}_k{k}"] = np.full(kc, np.nan)
        for side in ("left", "right"):
            th = arrays[f"angles_{side}_k{k}"]
            out[f"angle_{side}_mean_sin_k{k}"] = np.sin(th).mean()
            out[f"angle_{side}_max_rad_k{k}"] = th.max()
    out["nss"] = np.linalg.norm(sp - sb) / np.linalg.norm(sb)
    arrays["base_spectrum"], arrays["post_spectrum"] = sb, sp
    arrays["proj_left_by_rank"] = np.cumsum(((Ub.T @ D) ** 2).sum(1)) / fro2
    arrays["proj_right_by_rank"] = np.cumsum(((D @ Vbt.T) ** 2).sum(0)) / fro2
    z2 = (Ub.T @ D @ Vbt.T) ** 2
    arrays["proj_joint_by_rank"] = np.array([z2[:i + 1, :i + 1].sum() for i in range(mn)]) / fro2
    for side in ("left", "right", "joint"):
        arrays[f"proj_{side}_grid"] = _ref_grid(arrays[f"proj_{side}_by_rank"], mn)
    return out, arrays


def _ref_grid(by_rank, mn):
    """The by-rank curve at r = 2^(-14 + i/4): k = r·mn, linear between the stored integer ranks."""
    out = []
    for i in range(57):
        k = 2.0 ** (-14 + i / 4) * mn
        if k < 1 - 1e-12 or k > len(by_rank) + 1e-12:
            out.append(math.nan)
            continue
        lo = min(int(math.floor(k)), len(by_rank))
        hi = min(lo + 1, len(by_rank))
        t = k - lo
        out.append(by_rank[lo - 1] * (1 - t) + by_rank[hi - 1] * t if hi != lo else by_rank[lo - 1])
    return np.array(out)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "blocked-grams"])
def test_geometry_matches_reference(shape, dtype, blocked, monkeypatch):
    if blocked:     # the column-blocked symmetric Grams of wide matrices, forced on these small ones
        monkeypatch.setattr(linalg, "SYM_MIN_COLS", 1)
    wb, wp = _pair(shape, dtype)
    res = linalg_metrics(wb, wp, _masks(wb, wp), AnalysisOptions())
    ref, arrays = _ref_geometry(_np(wb), _np(wp))
    for k, v in ref.items():
        assert res.scalars[k] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True), k
    for k, v in arrays.items():
        assert res.arrays[k].shape == v.shape, k
        np.testing.assert_allclose(res.arrays[k], v, rtol=1e-6, atol=1e-9, err_msg=k)
    assert np.isfinite(res.arrays["proj_joint_grid"]).sum() > 10     # the grid reaches into the curve


def test_wide_is_transpose_of_tall_with_sides_swapped():
    wb, wp = _pair((40, 24), torch.float32, seed=3)
    tall = linalg_metrics(wb, wp, _masks(wb, wp), AnalysisOptions())
    wide = linalg_metrics(wb.T.contiguous(), wp.T.contiguous(), _masks(wb.T, wp.T), AnalysisOptions())
    for lab in ("1pct", "10pct", "20pct"):
        assert wide.scalars[f"principal_proj_left_{lab}"] == pytest.approx(tall.scalars[f"principal_proj_right_{lab}"])
        assert wide.scalars[f"principal_proj_right_{lab}"] == pytest.approx(tall.scalars[f"principal_proj_left_{lab}"])
    np.testing.assert_allclose(wide.arrays["angles_left_k16"], tall.arrays["angles_right_k16"], rtol=1e-7)
    # a non-contiguous transposed view gives the same as a contiguous copy
    view = linalg_metrics(wb.T, wp.T, _masks(wb.T, wp.T), AnalysisOptions())
    assert view.scalars == pytest.approx(wide.scalars, nan_ok=True)


def test_tiny_angles_stable():
    g = torch.Generator().manual_seed(4)
    B = torch.randn(60, 30, generator=g, dtype=torch.float64)
    P = B + 1e-6 * torch.randn(60, 30, generator=g, dtype=torch.float64)
    wb, wp = B.float(), P.float()
    res = linalg_metrics(wb, wp, _masks(wb, wp), AnalysisOptions(angle_ks=(4, 16)))
    Bn, Pn = _np(wb), _np(wp)
    Ub, _, Vbt = np.linalg.svd(Bn, full_matrices=False)
    Up, _, Vpt = np.linalg.svd(Pn, full_matrices=False)
    for k in (4, 16):
        ref_l, ref_r = _angles(Ub[:, :k], Up[:, :k]), _angles(Vbt[:k].T, Vpt[:k].T)
        assert ref_l.max() < 1e-5                      # genuinely tiny angles
        # arccos of fp32 (or Gram) cosines would give 0 or ~3e-4 here; sines agree to 1e-3 relative
        np.testing.assert_allclose(np.sin(res.arrays[f"angles_left_k{k}"]), np.sin(ref_l), rtol=1e-3, atol=1e-12)
        np.testing.assert_allclose(np.sin(res.arrays[f"angles_right_k{k}"]), np.sin(ref_r), rtol=1e-3, atol=1e-12)


def test_rank_deficient_base():
    g = torch.Generator().manual_seed(5)
    B = torch.randn(40, 6, generator=g) @ torch.randn(6, 24, generator=g)     # rank 6
    wb = B.float()
    wp = wb + 0.01 * torch.randn(40, 24, generator=g)
    res = linalg_metrics(wb, wp, _masks(wb, wp), AnalysisOptions(angle_ks=(4, 16)))
    ref, arrays = _ref_geometry(_np(wb), _np(wp), ks=(4,))
    for lab in ("1pct", "5pct", "10pct", "20pct"):        # k = 1, 1, 2, 4 ≤ rank
        for side in ("", "_left", "_right"):
            name = f"principal_proj{side}_{lab}"
            assert res.scalars[name] == pytest.approx(ref[name], rel=1e-5), name
    np.testing.assert_allclose(res.arrays["proj_right_by_rank"][:6], arrays["proj_right_by_rank"][:6], rtol=1e-5)
    for side in ("left", "right", "joint"):     # past the rank the base directions are undefined
        assert np.isnan(res.arrays[f"proj_{side}_by_rank"][6:]).all()
    np.testing.assert_allclose(res.arrays["angles_left_k4"], arrays["angles_left_k4"], rtol=1e-4, atol=1e-7)
    assert math.isnan(res.scalars["angle_left_mean_sin_k16"]) and len(res.arrays["angles_left_k16"]) == 16


def _ref_coverage(B, mask, alpha, r, decimals=None):
    Ub, sb, Vbt = np.linalg.svd(B, full_matrices=False)
    R = (Ub[:, :r] * sb[:r]) @ Vbt[:r]
    if decimals is not None:         # make exact ties exact in the reference too
        R = np.round(R, decimals)
    K = math.floor(alpha * R.size)
    top = np.argsort(-np.abs(R).ravel(), kind="stable")[:K]
    u = mask.ravel()
    return u[top].sum(), u.sum()


@pytest.fixture(params=["sorted", "histogram"])
def selection_path(request, monkeypatch):
    """Run a coverage test through both top-K selections (stable sort for small matrices, bit-pattern
    histogram for large ones), which must agree with the reference and with each other."""
    import opdviz.metrics.topk_coverage as topk_coverage

    monkeypatch.setattr(topk_coverage, "SMALL_SELECT", 1 << 40 if request.param == "sorted" else 0)
    return request.param


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_principal_coverage_matches_reference_mask(shape, dtype, selection_path):
    wb, wp = _pair(shape, dtype, seed=6, density=0.5)
    masks = _masks(wb, wp)
    opts = AnalysisOptions(coverage_fixed_rank=8)
    res = linalg_metrics(wb, wp, masks, opts)
    mn = min(shape)
    for a, lab in zip(opts.coverage_alphas, ("1pct", "5pct", "10pct", "20pct", "30pct", "50pct")):
        for r, pre in ((max(1, math.floor(a * mn)), "principal_coverage_"), (8, "principal_coverage_r8_")):
            for key, suffix in (("default", ""), ("exact", "exact_")):
                hit, total = _ref_coverage(_np(wb), masks[key].numpy(), a, r)
                # ours ranks the float32 reconstruction, the reference the float64 one: entries within
                # float32 rounding of each other may swap across the cut, so allow one element
                assert abs(res.scalars[f"{pre}{suffix}{lab}"] * total - hit) <= 1 + 1e-9, (pre, suffix, lab)


def test_principal_coverage_ties_by_flat_index(selection_path):
    # rank-1 base with many equal |entries|: the K-th value is tied, the first flat indices win
    # (‖row‖ = 2 so v₁ = row/2 and the float32 reconstruction is exact: true ties)
    col = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 0.5])
    row = torch.tensor([1.0, -1.0, 1.0, 1.0])
    for wb in ((col[:, None] * row[None, :]), (row[:, None] * col[None, :])):
        wp = wb.clone()
        d = torch.zeros_like(wb, dtype=torch.bool)
        d.view(-1)[::3] = True
        masks = {"default": d, "exact": d}
        res = linalg_metrics(wb, wp + 0.0, masks, AnalysisOptions(coverage_alphas=(0.25,), coverage_fixed_rank=1))
        hit, total = _ref_coverage(_np(wb), d.numpy(), 0.25, 1, decimals=6)
        assert res.scalars["principal_coverage_25pct"] == pytest.approx(hit / total)
        assert res.scalars["principal_coverage_r1_exact_25pct"] == pytest.approx(hit / total)


def test_approx_geometry_close_to_exact_on_decaying_base():
    g = torch.Generator().manual_seed(7)
    m, n = 120, 80
    qa, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    qb, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    B = (qa * 0.8 ** torch.arange(n, dtype=torch.float64)) @ qb.T
    wb = B.float()
    wp = (B + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64)).float()
    opts = dict(approx_rank=30, angle_ks=(4, 64), coverage_fixed_rank=4)
    a = linalg_metrics(wb, wp, _masks(wb, wp), AnalysisOptions(spectrum="approx", **opts))
    e = linalg_metrics(wb, wp, _masks(wb, wp), AnalysisOptions(spectrum="exact", **opts))
    assert not a.exact and e.exact
    for lab in ("1pct", "5pct", "10pct", "20pct"):
        assert a.scalars[f"principal_proj_{lab}"] == pytest.approx(e.scalars[f"principal_proj_{lab}"], rel=1e-3)
    np.testing.assert_allclose(a.arrays["base_spectrum"][:10], e.arrays["base_spectrum"][:10], rtol=1e-5)
    assert a.scalars["angle_right_max_rad_k4"] == pytest.approx(e.scalars["angle_right_max_rad_k4"], rel=1e-2)
    assert math.isnan(a.scalars["angle_left_max_rad_k64"]) and len(a.arrays["angles_left_k64"]) == 64
    assert math.isnan(a.scalars["principal_coverage_50pct"])          # r = 40 > q = 30
    assert a.scalars["principal_coverage_r4_exact_5pct"] == pytest.approx(e.scalars["principal_coverage_r4_exact_5pct"], abs=0.02)


def test_families_documented():
    names = {f.family for f in FAMILIES}
    assert {"principal_proj_{frac}", "angle_left_mean_sin_k{k}", "nss", "principal_coverage_{alpha}"} <= names
    assert all(f.kind in ("scalar", "array") and f.doc and f.source for f in FAMILIES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    wb, wp = _pair((96, 64), torch.bfloat16, seed=8)
    masks = _masks(wb, wp)
    cpu = linalg_metrics(wb, wp, masks, AnalysisOptions(device="cpu"))
    gpu = linalg_metrics(wb.cuda(), wp.cuda(), {k: v.cuda() for k, v in masks.items()}, AnalysisOptions(device="cuda"))
    assert gpu.exact
    for k, v in cpu.scalars.items():
        if "coverage" in k:       # float32 reconstruction order may differ: one element of slack
            assert gpu.scalars[k] == pytest.approx(v, abs=2 / max(1, int(masks["default"].sum()))), k
        else:
            assert gpu.scalars[k] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True), k
