"""Subnetwork masks: criteria agree with the elementwise metrics, file round trips (bool and packed), and
training only the masked coordinates keeps the others bit-identical under AdamW weight decay."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import factory
from opdviz.cli import across
from opdviz.errors import OptionsError
from opdviz.engine.masks import changed_mask, load_masks, parse_criterion, train_only_masked, write_masks
from opdviz.metrics.elementwise import elementwise_metrics
from opdviz.options import AnalysisOptions


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_criteria_equal_elementwise_masks(dtype):
    g = torch.Generator().manual_seed(0)
    wb = (torch.randn(48, 40, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    scale = 10 ** (-9 + 7 * torch.rand(48, 40, generator=g, dtype=torch.float64))     # |Δ| from 1e-9 to 1e-2
    wp = (wb.double() + torch.randn(48, 40, generator=g, dtype=torch.float64) * scale).to(dtype)
    opts = AnalysisOptions()
    for c in opts.criteria():
        ref = elementwise_metrics(wb, wp, dataclasses.replace(opts, criterion=c)).masks["default"]
        assert torch.equal(changed_mask(wb, wp, c, chunk=999), ref), c


def test_parse_criterion():
    assert parse_criterion("relrms_1e-3").kind == "relrms"
    assert parse_criterion("bf16_1e-3").value == pytest.approx(1e-3)
    with pytest.raises(OptionsError, match="unknown criterion"):
        parse_criterion("abs_x")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return factory.make_pair(tmp_path_factory.mktemp("mpair"), base_shards=2, post_shards=1)


@pytest.mark.parametrize("packed", [False, True])
def test_mask_file_round_trip(pair, tmp_path, packed):
    from safetensors.torch import load_file

    base, post = pair
    out = tmp_path / "m.safetensors"
    res = write_masks(base, post, out, "abs_1e-5", packed=packed, log=lambda *_: None)
    masks = load_masks(out)
    b = {}
    for f in sorted(base.glob("*.safetensors")):
        b.update(load_file(str(f)))
    p = load_file(str(post / "model.safetensors"))
    assert set(masks) == set(b) and res["tensors"] == len(b)
    total = 0
    for name, wb in b.items():
        d = np.abs(p[name].double().numpy() - wb.double().numpy())
        ref = d > 1e-5
        assert masks[name].dtype == torch.bool and tuple(masks[name].shape) == tuple(wb.shape)
        np.testing.assert_array_equal(masks[name].numpy(), ref)
        total += int(ref.sum())
    assert res["changed"] == total
    raw = load_file(str(out))
    assert all(t.dtype == (torch.uint8 if packed else torch.bool) for t in raw.values())


def test_cli_masks(pair, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    across.register(parser.add_subparsers())
    out = tmp_path / "m.safetensors"
    args = parser.parse_args(["masks", "--base", str(pair[0]), "--post", str(pair[1]), "--criterion", "exact",
                              "--out", str(out), "--packed"])
    assert args.func(args) == 0 and "under exact" in capsys.readouterr().out
    assert all(m.dtype == torch.bool for m in load_masks(out).values())


def test_frozen_coordinates_stay_bit_identical_under_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    masks = {name: torch.rand(p.shape) < 0.3 for name, p in model.named_parameters() if name != "2.bias"}
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = train_only_masked(model, masks, opt)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for name, p in model.named_parameters():
        m = masks.get(name, torch.zeros(p.shape, dtype=torch.bool))
        frozen_now = p.detach()[~m].view(torch.int32)
        assert torch.equal(frozen_now, before[name][~m].view(torch.int32)), name      # bit-identical
        if m.any():
            assert (p.detach()[m] != before[name][m]).float().mean() > 0.9, name      # the others move
    handle.remove()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()                                                   # hooks removed: everything trains again
    assert (model[2].bias.detach() != before["2.bias"]).all()
