"""Mask overlap of two runs sharing a base: exact counts, statistics and aggregation vs float64 numpy references;
refusal of different bases; the command line."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import torch

import factory
from figcheck import assert_valid
from opdviz.cli import across
from opdviz.errors import CheckpointError, OptionsError
from opdviz.options import AnalysisOptions
from opdviz.engine.overlap import OverlapSpec, run_overlap
from opdviz.io.reader import Checkpoint
from opdviz.store import Selection, Store
from opdviz.views.context import AcrossContext, ViewContext
from opdviz.views.across import overlap_groups, overlap_stats, top_overlaps
from opdviz.views.registry import figures_for

CFG = factory.llama_config(layers=2, hidden=32, ffn=48, heads=4, kv_heads=2, vocab=40)


def _perturb(base: dict, seed: int, frac: float, shared: dict | None = None) -> tuple[dict, dict]:
    """A copy of ``base`` changing a random ``frac`` of each tensor's entries by ≥ 0.25 (changed under every
    criterion), plus the entries in ``shared`` (name → flat indices); a few entries get a 1e-6-scale change
    (changed under exact and small ε only). Returns (state, name → bool mask of big changes)."""
    g = torch.Generator().manual_seed(seed)
    out, masks = {}, {}
    for name, w in base.items():
        flat = w.float().reshape(-1).clone()
        m = torch.rand(flat.numel(), generator=g) < frac
        if shared is not None:
            m[shared[name]] = True
        flat[m] += 0.25 + flat[m].abs()
        post = flat.view(w.shape).to(w.dtype).reshape(-1)
        # small entries (|w| < 2⁻⁷) moved by one bf16 ulp (< 6.2e-5): changed under exact and small ε only
        tiny = (torch.rand(flat.numel(), generator=g) < 0.5) & ~m & (w.float().reshape(-1).abs() < 2 ** -7)
        post.view(torch.int16)[tiny] += 1
        out[name] = post.view(w.shape)
        masks[name] = m.view(w.shape)
    return out, masks


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    base = factory.make_llama_state(CFG, seed=0)
    g = torch.Generator().manual_seed(5)
    shared = {n: torch.randperm(w.numel(), generator=g)[: max(1, w.numel() // 10)] for n, w in base.items()}
    a, ma = _perturb(base, 1, 0.2, shared)
    b, mb = _perturb(base, 2, 0.3, shared)
    paths = {"base": factory.save_checkpoint(base, root / "base", config=CFG, shards=2),
             "a": factory.save_checkpoint(a, root / "a", config=CFG, shards=3),
             "b": factory.save_checkpoint(b, root / "b", config=CFG)}
    return paths, {"base": base, "a": a, "b": b}, ma, mb


def _np_masks(wb: torch.Tensor, wp: torch.Tensor, opts: AnalysisOptions) -> dict[str, np.ndarray]:
    """Reference changed masks in float64 numpy from the stored values."""
    b = wb.float().double().numpy().ravel()
    p = wp.float().double().numpy().ravel()
    d = np.abs(p - b)
    rms = np.sqrt(np.mean(b ** 2))
    out = {"exact": wb.view(torch.int16).numpy().ravel() != wp.view(torch.int16).numpy().ravel()}
    for c in opts.criteria()[1:]:
        kind, _, v = c.partition("_")
        v = float(v)
        out[c] = d > (v if kind == "abs" else v * rms if kind == "relrms" else v * np.maximum(np.abs(b), np.abs(p)))
    return out


def _spec(paths, db, **kw) -> OverlapSpec:
    kw = {"method_a": "OPD", "method_b": "RL", **kw}
    return OverlapSpec(base=paths["base"], a=paths["a"], b=paths["b"], run_a="A", run_b="B", db=db, **kw)


def test_counts_match_numpy_for_every_criterion(three, tmp_path):
    paths, states, ma, mb = three
    opts = AnalysisOptions()
    res = run_overlap(_spec(paths, tmp_path / "o.duckdb"), progress=False)
    assert res["n_tensors"] == len(states["base"])
    df = Store(tmp_path / "o.duckdb").query("SELECT * FROM overlap")
    assert set(df["criterion"]) == set(opts.criteria())
    assert len(df) == len(states["base"]) * len(opts.criteria())
    for name, wb in states["base"].items():
        ra = _np_masks(wb, states["a"][name], opts)
        rb = _np_masks(wb, states["b"][name], opts)
        got = df[df["tensor"] == name].set_index("criterion")
        for c in opts.criteria():
            row = got.loc[c]
            assert (row.n_a, row.n_b, row.n_ab, row.numel) == (ra[c].sum(), rb[c].sum(), (ra[c] & rb[c]).sum(),
                                                                 wb.numel()), (name, c)
        # the big changes are changed under every criterion: the strictest one counts exactly them
        big = got.loc["abs_1e-4"]
        assert (big.n_a, big.n_b, big.n_ab) == (int(ma[name].sum()), int(mb[name].sum()),
                                                int((ma[name] & mb[name]).sum()))
    assert (df["n_ab"] >= df["numel"] // 10).all()        # the shared tenth is in every intersection
    exact, strict = (df.loc[df.criterion == c, "n_a"].to_numpy() for c in ("exact", "abs_1e-4"))
    assert (exact >= strict).all() and exact.sum() > strict.sum()     # the criteria do differ here


def test_statistics_and_baselines():
    df = pd.DataFrame({"n_a": [20, 0, 50], "n_b": [30, 10, 50], "n_ab": [10, 0, 50], "numel": [100, 100, 100]})
    s = overlap_stats(df)
    pa, pb = 0.2, 0.3
    assert s.jaccard[0] == pytest.approx(10 / 40)
    assert s.jaccard_baseline[0] == pytest.approx(pa * pb / (pa + pb - pa * pb))
    assert s.cov_a[0] == pytest.approx(0.5) and s.cov_a_baseline[0] == pytest.approx(pb)
    assert s.cov_b[0] == pytest.approx(1 / 3) and s.cov_b_baseline[0] == pytest.approx(pa)
    assert s.cov_a_ratio[0] == pytest.approx(0.5 / pb)
    assert s.jaccard_ratio[0] == pytest.approx(0.25 / (pa * pb / (pa + pb - pa * pb)))
    assert np.isnan(s.cov_a[1]) and s.jaccard[1] == 0 and s.jaccard_baseline[1] == 0 and np.isnan(s.jaccard_ratio[1])
    assert s.jaccard[2] == 1 and s.cov_a[2] == 1


def test_aggregation_sums_counts(three, tmp_path):
    paths, states, _, _ = three
    db = tmp_path / "o.duckdb"
    run_overlap(_spec(paths, db), progress=False)
    store = Store(db)
    per = overlap_groups(store, "A", "B", "abs_1e-5", "tensor")
    by_mod = overlap_groups(store, "A", "B", "abs_1e-5", "module")
    ref = per.groupby(["block", "module"])[["n_a", "n_b", "n_ab", "numel"]].sum().reset_index()
    ref = overlap_stats(ref)
    m = by_mod.merge(ref, on=["block", "module"], suffixes=("", "_ref"))
    assert len(m) == len(ref)
    for c in ("n_a", "n_b", "n_ab", "numel", "jaccard", "cov_a", "cov_b", "jaccard_baseline"):
        np.testing.assert_allclose(m[c].astype(float), m[f"{c}_ref"].astype(float), rtol=1e-12)
    total = overlap_groups(store, "A", "B", "abs_1e-5", "all").iloc[0]
    assert total.numel == sum(w.numel() for w in states["base"].values())
    # numel-weighted, not a mean of per-tensor ratios
    assert total.jaccard == pytest.approx(per.n_ab.sum() / (per.n_a.sum() + per.n_b.sum() - per.n_ab.sum()))
    top = top_overlaps(store, Selection(), AcrossContext(run_a="A", run_b="B"))
    assert top["jaccard_ratio"].is_monotonic_decreasing and len(top)
    for spec in figures_for("overlap"):      # a plain ViewContext works too
        fig, data = spec.build(store, Selection(), ViewContext(run_a="A", run_b="B"))
        assert_valid(fig)
        assert not (fig.layout.meta or {}).get("empty"), spec.key
        assert not data.empty


def test_resume_and_overwrite_do_not_duplicate(three, tmp_path):
    paths, states, _, _ = three
    db = tmp_path / "o.duckdb"
    run_overlap(_spec(paths, db), progress=False)
    first = Store(db).query("SELECT * FROM overlap ORDER BY tensor, criterion")
    run_overlap(_spec(paths, db), progress=False)
    run_overlap(_spec(paths, db), progress=False, overwrite=True)
    again = Store(db).query("SELECT * FROM overlap ORDER BY tensor, criterion")
    pd.testing.assert_frame_equal(first, again)
    # other thresholds need --overwrite
    with pytest.raises(OptionsError, match="other criteria"):
        run_overlap(_spec(paths, db, options=AnalysisOptions(abs_eps=(1e-5,))), progress=False)


def test_refuses_different_bases(three, tmp_path, monkeypatch):
    paths, states, _, _ = three
    other = factory.save_checkpoint(factory.make_llama_state(CFG, seed=9), tmp_path / "other", config=CFG)
    with pytest.raises(CheckpointError, match="bases differ"):
        run_overlap(_spec(paths, tmp_path / "o.duckdb", base_b=other), progress=False)
    # same fingerprint (monkeypatched) but different bytes: caught by the streaming check
    monkeypatch.setattr(Checkpoint, "fingerprint", lambda self: "same")
    with pytest.raises(CheckpointError, match="bases differ at tensor"):
        run_overlap(_spec(paths, tmp_path / "o2.duckdb", base_b=other), progress=False)


def test_refuses_runs_with_another_base_or_unknown_runs(three, tmp_path):
    paths, _, _, _ = three
    db = tmp_path / "o.duckdb"
    with pytest.raises(OptionsError, match="not in"):
        run_overlap(_spec(paths, db, method_a=None), progress=False)
    run_overlap(_spec(paths, db), progress=False)             # registers A and B as reference runs
    runs = Store(db).runs().set_index("run_id")
    assert runs.loc["A", "kind"] == "reference" and runs.loc["A", "method"] == "OPD"
    other = factory.save_checkpoint(factory.make_llama_state(CFG, seed=9), tmp_path / "other", config=CFG)
    with pytest.raises(CheckpointError, match="differs from --base"):
        run_overlap(OverlapSpec(base=other, a=paths["a"], b=paths["b"], run_a="A", run_b="B", db=db), progress=False)
    with pytest.raises(OptionsError, match="differs from --a"):
        run_overlap(OverlapSpec(base=paths["base"], a=paths["b"], b=paths["a"], run_a="A", run_b="B", db=db),
                    progress=False)


def test_cli_overlap(three, tmp_path, capsys):
    paths, _, _, _ = three
    parser = argparse.ArgumentParser()
    across.register(parser.add_subparsers())
    db = tmp_path / "o.duckdb"
    args = parser.parse_args(["overlap", "--db", str(db), "--base", str(paths["base"]), "--a", str(paths["a"]),
                              "--b", str(paths["b"]), "--run-a", "A", "--run-b", "B", "--method-a", "OPD",
                              "--method-b", "RL", "--no-progress", "--abs-eps", "1e-5"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "Jaccard" in out and "A ∩ B" in out
    assert Store(db).fold()
    assert set(Store(db).query("SELECT DISTINCT criterion FROM overlap")["criterion"]) == set(
        AnalysisOptions(abs_eps=(1e-5,)).criteria())
