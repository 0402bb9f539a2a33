"""Elementwise metrics against a plain numpy float64 reference written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opdviz.errors import TensorMismatchError
from opdviz.metrics.deltatop import SWEEP_EPS, TOP_FRACS
from opdviz.metrics.families import ELEMENTWISE as FAMILIES
from opdviz.metrics.elementwise import elementwise_metrics
from opdviz.metrics.registry import all_families, family_of
from opdviz.options import AnalysisOptions, fmt_num, fmt_pct

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def make_pair(shape, dtype, seed=0, frac=0.4, scale=1e-3):
    """A base with many ties (quantized to 1/64 steps), a post changing ``frac`` of the coordinates."""
    g = torch.Generator().manual_seed(seed)
    base = torch.round(torch.randn(shape, generator=g, dtype=torch.float64) * 64) / 64 * 0.05
    moved = torch.rand(shape, generator=g, dtype=torch.float64) < frac
    noise = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    noise = noise * torch.logspace(-6, 0, noise.numel(), dtype=torch.float64).view(shape)[
        ..., torch.randperm(shape[-1], generator=g)] if len(shape) == 2 else noise
    post = base + noise * moved
    return base.to(dtype), post.to(dtype)


# ------------------------------------------------------------------ the reference (float64 numpy)

def bits(t: torch.Tensor) -> np.ndarray:
    it = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(it).numpy().ravel()


def reference(wb: torch.Tensor, wp: torch.Tensor, opts: AnalysisOptions):
    b = wb.to(torch.float64).contiguous().numpy().ravel()
    p = wp.to(torch.float64).contiguous().numpy().ravel()
    fdt = np.float64 if wb.dtype == torch.float64 else np.float32
    d = np.abs((p.astype(fdt) - b.astype(fdt)).astype(np.float64))    # ΔW in float32 from stored values
    n = b.size
    rms = math.sqrt(np.sum(b * b) / n)
    changed = {"exact": bits(wb) != bits(wp)}
    for e in opts.abs_eps:
        changed[f"abs_{fmt_num(e)}"] = d > e
    for t in opts.relrms_tau:
        changed[f"relrms_{fmt_num(t)}"] = d > t * rms
    for h in opts.bf16_eta:
        changed[f"bf16_{fmt_num(h)}"] = d > h * np.maximum(np.abs(b), np.abs(p))
    s = {f"sparsity_{c}": 1 - changed[c].sum() / n for c in opts.criteria()}
    s.update(base_sq_sum=np.sum(b * b), post_sq_sum=np.sum(p * p), delta_sq_sum=np.sum(d * d),
             delta_max_abs=d.max(), delta_mean_abs=d.mean(), base_rms=rms)
    s.update(base_fro=math.sqrt(s["base_sq_sum"]), post_fro=math.sqrt(s["post_sq_sum"]),
             delta_fro=math.sqrt(s["delta_sq_sum"]), delta_rms=math.sqrt(s["delta_sq_sum"] / n))
    s["rel_change"] = s["delta_fro"] / s["base_fro"] if s["base_fro"] else math.nan
    srt = np.sort(d)[::-1]
    for q in TOP_FRACS:
        k = max(1, math.ceil(q * n - 1e-9))
        s[f"coord_energy_top_{fmt_pct(q)}"] = np.sum(srt[:k] ** 2) / s["delta_sq_sum"] if s["delta_sq_sum"] else math.nan
    order = np.argsort(np.abs(b), kind="stable")
    ud, ue = changed[opts.criterion], changed["exact"]
    for a in opts.coverage_alphas:
        low = order[:math.floor(a * n + 1e-9)]
        s[f"lowmag_coverage_{fmt_pct(a)}"] = ud[low].sum() / ud.sum() if ud.any() else math.nan
        s[f"lowmag_coverage_exact_{fmt_pct(a)}"] = ue[low].sum() / ue.sum() if ue.any() else math.nan
    arrays = {}
    for name, u in (("decile_density", ud), ("decile_density_exact", ue)):
        arrays[name] = np.array([u[order[d * n // 10:(d + 1) * n // 10]].mean() if (d + 1) * n // 10 > d * n // 10
                                 else math.nan for d in range(10)])
    arrays["abs_sweep_eps"] = np.array(SWEEP_EPS)
    arrays["abs_sweep_sparsity"] = np.array([np.mean(d <= e) for e in SWEEP_EPS])
    if wb.dim() == 2:
        m, k = wb.shape
        u2 = ud.reshape(m, k).astype(np.float64)
        bh, bw = -(-m // opts.map_size), -(-k // opts.map_size)
        arrays["sparsity_map"] = np.array([[u2[i:i + bh, j:j + bw].mean() for j in range(0, k, bw)]
                                           for i in range(0, m, bh)])
        arrays["row_changed_frac"] = u2.mean(1)
        arrays["col_changed_frac"] = u2.mean(0)
    return s, arrays, {"default": ud, "exact": ue}


COUNT_LIKE = ("sparsity_", "lowmag_coverage_")


def assert_matches(res, ref):
    s, arrays, masks = ref
    assert set(res.scalars) == set(s)
    for k, v in s.items():
        if k.startswith(COUNT_LIKE):          # ratios of exact counts
            np.testing.assert_allclose(res.scalars[k], v, rtol=1e-12, atol=0, err_msg=k)
        else:
            np.testing.assert_allclose(res.scalars[k], v, rtol=1e-6, atol=0, err_msg=k)
    assert set(res.arrays) == set(arrays)
    for k, v in arrays.items():
        assert res.arrays[k].dtype == np.float64 and res.arrays[k].shape == v.shape, k
        np.testing.assert_allclose(res.arrays[k], v, rtol=1e-12, atol=0, err_msg=k)
    for k, v in masks.items():
        assert res.masks[k].dtype == torch.bool
        np.testing.assert_array_equal(res.masks[k].reshape(-1).numpy(), v, err_msg=k)


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(257, 131), (40, 300), (1000,), (300, 257)])  # the last > _SMALL_EXACT
def test_matches_reference(dtype, shape):
    opts = AnalysisOptions(map_size=16)      # 257 and 131 are not multiples of the block size
    wb, wp = make_pair(shape, dtype)
    res = elementwise_metrics(wb, wp, opts)
    assert_matches(res, reference(wb, wp, opts))
    assert res.masks["default"].shape == wb.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frac", [0.0003, 0.03])
def test_sparse_updates(dtype, frac):
    """Fewer changed coordinates than the top-q counts: the boundary falls among the zeros."""
    opts = AnalysisOptions(map_size=32)
    wb, wp = make_pair((257, 131), dtype, seed=7, frac=frac)
    assert_matches(elementwise_metrics(wb, wp, opts), reference(wb, wp, opts))


@pytest.mark.parametrize("criterion", ["exact", "relrms_1e-3", "bf16_1e-3", "abs_1e-4"])
def test_default_criterion(criterion):
    opts = AnalysisOptions(criterion=criterion, map_size=7)
    wb, wp = make_pair((63, 50), torch.bfloat16, seed=3)
    assert_matches(elementwise_metrics(wb, wp, opts), reference(wb, wp, opts))


def test_float64_input():
    wb, wp = make_pair((30, 20), torch.float64, seed=4)
    opts = AnalysisOptions()
    assert_matches(elementwise_metrics(wb, wp, opts), reference(wb, wp, opts))


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_view(dtype):
    wb, wp = make_pair((120, 77), dtype, seed=1)
    tb, tp = wb.T, wp.T                       # [77, 120] non-contiguous views
    assert not tb.is_contiguous()
    opts = AnalysisOptions(map_size=10, chunk_elems=500)
    res = elementwise_metrics(tb, tp, opts)
    assert_matches(res, reference(tb, tp, opts))
    assert res.masks["exact"].shape == tb.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_chunks_equal_one_chunk(dtype):
    wb, wp = make_pair((97, 33), dtype, seed=2)
    one = elementwise_metrics(wb, wp, AnalysisOptions(chunk_elems=1 << 24))
    many = elementwise_metrics(wb, wp, AnalysisOptions(chunk_elems=1))     # one row per chunk
    assert set(one.scalars) == set(many.scalars)
    for k in one.scalars:
        np.testing.assert_allclose(many.scalars[k], one.scalars[k], rtol=1e-6, atol=0, err_msg=k)
    for k in one.arrays:
        np.testing.assert_array_equal(many.arrays[k], one.arrays[k], err_msg=k)
    for k in one.masks:
        assert torch.equal(one.masks[k], many.masks[k])


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_equal_pair(dtype):
    wb, _ = make_pair((50, 20), dtype)
    res = elementwise_metrics(wb, wb.clone(), AnalysisOptions())
    assert all(res.scalars[f"sparsity_{c}"] == 1.0 for c in AnalysisOptions().criteria())
    assert res.scalars["delta_fro"] == 0 and res.scalars["delta_max_abs"] == 0
    assert math.isnan(res.scalars["coord_energy_top_1pct"])
    assert math.isnan(res.scalars["lowmag_coverage_10pct"])
    assert np.isnan(res.arrays["decile_density"]).sum() == 0 and not res.arrays["decile_density"].any()
    assert not res.masks["exact"].any()


def test_zero_base_rel_change_nan():
    wb = torch.zeros(10, 10, dtype=torch.bfloat16)
    wp = wb.clone()
    wp[0, 0] = 1.0
    res = elementwise_metrics(wb, wp, AnalysisOptions())
    assert math.isnan(res.scalars["rel_change"]) and res.scalars["delta_sq_sum"] == 1.0
    assert res.scalars["coord_energy_top_0.1pct"] == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zero_is_exact_change_only(dtype):
    """-0.0 vs +0.0: different stored bits, so changed under 'exact', unchanged under every threshold."""
    wb = torch.zeros(8, 4, dtype=dtype)
    wp = wb.clone()
    wp[1, 2] = -0.0
    res = elementwise_metrics(wb, wp, AnalysisOptions())
    assert res.scalars["sparsity_exact"] == 1 - 1 / 32
    assert res.scalars["sparsity_abs_1e-8"] == 1.0 and res.scalars["sparsity_bf16_1e-3"] == 1.0
    assert res.masks["exact"][1, 2] and res.masks["exact"].sum() == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["base", "post"])
def test_nonfinite_raises(dtype, bad, where):
    wb, wp = make_pair((20, 10), dtype)
    (wb if where == "base" else wp)[3, 4] = bad
    with pytest.raises(TensorMismatchError, match="1 NaN/Inf values"):
        elementwise_metrics(wb, wp, AnalysisOptions())


@pytest.mark.parametrize("wb,wp", [
    (torch.zeros(3, 4), torch.zeros(4, 3)),
    (torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float16)),
    (torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32)),
    (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)),
    (torch.zeros(0), torch.zeros(0)),
])
def test_bad_pairs_raise(wb, wp):
    with pytest.raises(TensorMismatchError):
        elementwise_metrics(wb, wp, AnalysisOptions())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    wb, wp = make_pair((301, 129), dtype, seed=5)
    opts = AnalysisOptions(map_size=16, chunk_elems=5000)
    cpu = elementwise_metrics(wb, wp, opts)
    gpu = elementwise_metrics(wb.cuda().T, wp.cuda().T, opts)
    ref = reference(wb.T, wp.T, opts)
    assert gpu.masks["default"].is_cuda
    gpu.masks = {k: v.cpu() for k, v in gpu.masks.items()}
    assert_matches(gpu, ref)
    assert cpu.scalars.keys() == gpu.scalars.keys()


def test_families_cover_every_name():
    wb, wp = make_pair((20, 30), torch.bfloat16)
    res = elementwise_metrics(wb, wp, AnalysisOptions())
    own = {f.family for f in FAMILIES}
    for name in list(res.scalars) + list(res.arrays):
        info = family_of(name)
        assert info.family in own, name
        assert (info.kind == "scalar") == (name in res.scalars), name
    assert family_of("lowmag_coverage_exact_10pct").family == "lowmag_coverage_exact_{alpha}"
    assert all(f.kind in ("scalar", "array") and f.doc and f.source for f in all_families())
    with pytest.raises(KeyError):
        family_of("no_such_metric")
