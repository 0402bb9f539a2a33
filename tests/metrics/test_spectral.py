"""ΔW spectrum metrics against a plain float64 numpy reference (np.linalg.svd of the stored Δ).

Tolerance: the exact path takes σ from float64 Grams, whose absolute error is ≈ eps64·σ₁²/(2σ) —
far below 1e-6·σ₁ for every σ — so spectra are checked with atol = 1e-6·σ₁ (the stated accuracy).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opdviz.metrics import linalg
from opdviz.metrics.geometry import linalg_metrics
from opdviz.metrics.families import SPECTRAL as FAMILIES
from opdviz.metrics.spectral import spectrum_metrics
from opdviz.options import AnalysisOptions


def _masks(wb, wp):
    d = wp.float() - wb.float()
    return {"default": d.abs() > 1e-5, "exact": wp != wb}


def _pair(shape, dtype, seed=0, scale=1e-2, density=0.3):
    g = torch.Generator().manual_seed(seed)
    wb = torch.randn(*shape, generator=g)
    upd = torch.randn(*shape, generator=g) * scale * (torch.rand(*shape, generator=g) < density)
    return wb.to(dtype), (wb + upd).to(dtype)


def _ref_delta(wb, wp):
    return (wp.float() - wb.float()).double().numpy()


def _ref_spectrum_scalars(d):
    s = np.linalg.svd(d, compute_uv=False)
    m, n = d.shape
    mn = min(m, n)
    fro2 = (d ** 2).sum()
    p = s / s.sum()
    p = p[p > 0]
    out = {"stable_rank": fro2 / s[0] ** 2, "effective_rank": np.exp(-(p * np.log(p)).sum()), "sigma_max": s[0]}
    for t, name in ((1e-6, "1e-6"), (1e-5, "1e-5"), (1e-4, "1e-4")):
        out[f"numerical_rank_{name}"] = (s > t * s[0]).sum()
        out[f"numerical_rank_{name}_pct"] = 100 * (s > t * s[0]).sum() / mn
    out["numerical_rank_default"] = (s > s[0] * max(m, n) * np.finfo(np.float32).eps).sum()
    for k in (1, 2, 4, 8, 16, 32, 64):
        out[f"top{k}_energy"] = (s[:min(k, mn)] ** 2).sum() / fro2
    for q, lab in ((0.01, "1pct"), (0.05, "5pct"), (0.10, "10pct")):
        out[f"top_rank_{lab}_energy"] = (s[:math.ceil(q * mn)] ** 2).sum() / fro2
    return s, out


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "blocked-grams"])
def test_spectrum_matches_numpy(shape, dtype, blocked, monkeypatch):
    if blocked:     # the column-blocked symmetric Grams of wide matrices, forced on these small ones
        monkeypatch.setattr(linalg, "SYM_MIN_COLS", 1)
    wb, wp = _pair(shape, dtype)
    res = linalg_metrics(wb, wp, _masks(wb, wp), AnalysisOptions())
    s, ref = _ref_spectrum_scalars(_ref_delta(wb, wp))
    assert res.exact and res.scalars["spectrum_exact"] == 1.0
    np.testing.assert_allclose(res.arrays["spectrum"], s, rtol=0, atol=1e-6 * s[0])
    for k, v in ref.items():
        if k.startswith("numerical_rank"):
            assert res.scalars[k] == v, k     # random Δ: no σ near a threshold
        else:
            assert res.scalars[k] == pytest.approx(v, rel=1e-6), k
    assert res.arrays["spectrum"].dtype == np.float64


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "blocked-grams"])
def test_low_rank_delta(shape, blocked, monkeypatch):
    if blocked:
        monkeypatch.setattr(linalg, "SYM_MIN_COLS", 1)
    # dyadic base and rank-3 update: exact in float32, so Δ is exactly rank 3
    g = torch.Generator().manual_seed(1)
    wb = torch.randint(-8, 8, shape, generator=g).float() / 8
    u = torch.randint(-4, 5, (shape[0], 3), generator=g).float() / 4
    v = torch.randint(-4, 5, (3, shape[1]), generator=g).float() / 4
    wp = wb + u @ v
    res = linalg_metrics(wb, wp, _masks(wb, wp), AnalysisOptions())
    s, ref = _ref_spectrum_scalars(_ref_delta(wb, wp))
    for name in ("1e-6", "1e-5", "1e-4", "default"):
        assert res.scalars[f"numerical_rank_{name}"] == 3
    assert res.scalars["numerical_rank_1e-6_pct"] == pytest.approx(300 / min(shape))
    assert res.scalars["top4_energy"] == pytest.approx(1.0, rel=1e-12)
    for k in (1, 2):
        assert res.scalars[f"top{k}_energy"] == pytest.approx(ref[f"top{k}_energy"], rel=1e-9)
    np.testing.assert_allclose(res.arrays["spectrum"][:3], s[:3], rtol=1e-9)
    assert np.all(res.arrays["spectrum"][3:] < 1e-6 * s[0])


def test_zero_delta_gives_zero_ranks_and_nan_ratios():
    wb = torch.randn(40, 24).bfloat16()
    res = linalg_metrics(wb, wb.clone(), _masks(wb, wb), AnalysisOptions())
    sc = res.scalars
    assert sc["sigma_max"] == 0 and sc["numerical_rank_1e-6"] == 0 and sc["numerical_rank_default"] == 0
    for k in ("stable_rank", "effective_rank", "top1_energy", "top_rank_10pct_energy", "principal_proj_5pct",
              "principal_coverage_5pct", "principal_coverage_exact_5pct"):
        assert math.isnan(sc[k]), k
    assert sc["nss"] == 0
    assert sc["angle_left_max_rad_k16"] == pytest.approx(0, abs=1e-7)


def _decaying(shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    qa, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    qb, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = 0.7 ** torch.arange(min(m, n), dtype=torch.float64)
    return (qa * s) @ qb.T


def test_approx_mode_top_k_and_rerun_identical():
    wb = torch.randn(120, 80, dtype=torch.float64).float()
    wp = (wb.double() + _decaying((120, 80))).float()
    opts = AnalysisOptions(spectrum="approx", approx_rank=20)
    a = linalg_metrics(wb, wp, _masks(wb, wp), opts)
    b = linalg_metrics(wb, wp, _masks(wb, wp), opts)
    ex = linalg_metrics(wb, wp, _masks(wb, wp), AnalysisOptions(spectrum="exact"))
    assert a.exact is False and a.scalars["spectrum_exact"] == 0.0 and ex.exact is True
    assert len(a.arrays["spectrum"]) == 20
    np.testing.assert_allclose(a.arrays["spectrum"][:10], ex.arrays["spectrum"][:10], rtol=1e-5)
    for k in (1, 2, 4, 8, 16):
        assert a.scalars[f"top{k}_energy"] == pytest.approx(ex.scalars[f"top{k}_energy"], rel=1e-5)
    assert math.isnan(a.scalars["top32_energy"]) and math.isnan(a.scalars["effective_rank"])
    assert math.isnan(a.scalars["nss"])
    # every number identical on rerun (seeded sketch in a forked RNG)
    for k, v in a.scalars.items():
        assert (v == b.scalars[k]) or (math.isnan(v) and math.isnan(b.scalars[k])), k
    for k, v in a.arrays.items():
        np.testing.assert_array_equal(v, b.arrays[k])


def test_auto_mode_switches_to_approx_on_cpu_above_exact_max_dim():
    wb, wp = _pair((50, 40), torch.float32)
    res = linalg_metrics(wb, wp, _masks(wb, wp), AnalysisOptions(exact_max_dim=30, approx_rank=8))
    assert res.exact is False and len(res.arrays["spectrum"]) == 8


def test_spectrum_metrics_numerical_rank_nan_when_count_reaches_q():
    sc = spectrum_metrics(np.array([3.0, 2.0, 1.0]), 20.0, 50, 40, exact=False)
    assert math.isnan(sc["numerical_rank_1e-6"]) and sc["stable_rank"] == pytest.approx(20 / 9)
    assert sc["top2_energy"] == pytest.approx(13 / 20) and math.isnan(sc["top4_energy"])


def test_families_documented():
    names = {f.family for f in FAMILIES}
    assert {"stable_rank", "numerical_rank_{t}", "top{k}_energy", "spectrum"} <= names
    assert all(f.kind in ("scalar", "array") and f.doc and f.source for f in FAMILIES)
