"""The Gram helpers of opdviz.metrics.linalg against plain float64 numpy products."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opdviz.metrics import linalg


@pytest.mark.parametrize("cols", [24, 255, 256, 301])
@pytest.mark.parametrize("min_cols", [1, linalg.SYM_MIN_COLS])
def test_sym_gram_equals_full_product(cols, min_cols, monkeypatch):
    monkeypatch.setattr(linalg, "SYM_MIN_COLS", min_cols)
    g = torch.Generator().manual_seed(cols)
    a = torch.randn(50, cols, generator=g, dtype=torch.float64)
    acc = torch.zeros(cols, cols, dtype=torch.float64)
    linalg.add_sym_gram(acc, a[:20])          # accumulated over row chunks, as the Gram passes do
    linalg.add_sym_gram(acc, a[20:])
    ref = a.numpy().T @ a.numpy()
    full = linalg.lower_to_full(acc)
    np.testing.assert_allclose(full.numpy(), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    assert torch.equal(full, full.T)


def test_base_and_cross_grams_equal_numpy():
    g = torch.Generator().manual_seed(0)
    wb = torch.randn(300, 260, generator=g).to(torch.bfloat16)
    wp = (wb.float() + 1e-2 * torch.randn(300, 260, generator=g)).to(torch.bfloat16)
    B, D = wb.double().numpy(), (wp.float() - wb.float()).double().numpy()
    gb = linalg.base_gram(wb)
    x, gd = linalg.cross_grams(wb, wp)
    for got, ref in ((gb, B.T @ B), (x, B.T @ D), (gd, D.T @ D)):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
