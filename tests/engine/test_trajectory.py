"""Trajectories: checkpoint discovery, consecutive sparsity, outside-final share, Sim_K and Hill vs float64 numpy
references, per-step runs, resumability and the command line."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

import factory
from figcheck import assert_valid
from opdviz.cli import across
from opdviz.errors import OptionsError
from opdviz.options import AnalysisOptions
from opdviz.store import Selection, Store
from opdviz.engine.trajectory import (TrajectorySpec, delta_spectrum, find_checkpoints, hill_alpha, run_trajectory,
                               subspace_sim)
from opdviz.store.across import trajectories
from opdviz.views.across import trajectory_by_module
from opdviz.views.context import AcrossContext
from opdviz.views.registry import figures_for

CFG = factory.llama_config(layers=1, hidden=32, ffn=48, heads=4, kv_heads=2, vocab=40)
STEPS = (10, 20, 30)
K = 4
OPTS = AnalysisOptions(abs_eps=(1e-5,), relrms_tau=(1e-3,), spectrum="exact")


def _steps(base: dict) -> list[dict]:
    """Three checkpoints in float32: step 1 changes a random 20 % (set S1); step 2 keeps S1's values, reverts a
    third of them to the base and changes a new 20 %; step 3 (final) changes S2 ∪ a new 10 % again."""
    g = torch.Generator().manual_seed(3)
    out, cur = [], {k: v.clone() for k, v in base.items()}
    masks = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in base.items()}
    for s in range(3):
        nxt = {}
        for k, w in cur.items():
            new = torch.rand(w.shape, generator=g) < (0.2 if s < 2 else 0.1)
            revert = masks[k] & (torch.rand(w.shape, generator=g) < 1 / 3) if s == 1 else torch.zeros_like(new)
            upd = torch.randn(w.shape, generator=g) * 0.05 * (1 + s)
            x = torch.where(new | (masks[k] & (s == 2)), w + upd, w)
            x = torch.where(revert, base[k], x)
            masks[k] = (masks[k] | new) & ~revert
            nxt[k] = x
        out.append(nxt)
        cur = nxt
    return out


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    root = tmp_path_factory.mktemp("traj")
    base = factory.make_llama_state(CFG, seed=0, dtype=torch.float32)
    states = _steps(base)
    bpath = factory.save_checkpoint(base, root / "base", config=CFG)
    for step, sd in zip(STEPS, states):
        factory.save_checkpoint(sd, root / "run" / f"checkpoint-{step}", config=CFG)
    (root / "run" / "logs").mkdir()
    db = root / "t.duckdb"
    res = run_trajectory(TrajectorySpec(base=bpath, checkpoints=find_checkpoints([root / "run"]), name="grpo",
                                        method="RL", db=db, options=OPTS, k=K), progress=False)
    return root, base, states, db, res


def _ref_masks(b: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    return {"abs_1e-5": np.abs(p - b) > 1e-5, "exact": p != b}


def _ref_v(d: np.ndarray, k: int) -> np.ndarray:
    return np.linalg.svd(d, full_matrices=False)[2][:k].T


def test_find_checkpoints(tmp_path):
    for s in (100, 20, 3):
        (tmp_path / f"checkpoint-{s}").mkdir()
    (tmp_path / "runs").mkdir()
    assert [s for s, _ in find_checkpoints([tmp_path])] == [3, 20, 100]
    assert [s for s, _ in find_checkpoints([tmp_path / "a", tmp_path / "b"], [5, 1])] == [1, 5]
    assert [s for s, _ in find_checkpoints([tmp_path / "step_7", tmp_path / "global_step12"])] == [7, 12]
    with pytest.raises(OptionsError, match="cannot tell the step"):
        find_checkpoints([tmp_path / "final", tmp_path / "x"])
    with pytest.raises(OptionsError, match="steps"):
        find_checkpoints([tmp_path / "a"], [1, 2])


def test_trajectory_metrics_match_numpy(traj):
    root, base, states, db, res = traj
    assert res["steps"] == list(STEPS) and res["n_failed"] == 0
    df = Store(db).query("SELECT * FROM trajectory WHERE trajectory = 'grpo'")
    names = list(base)
    assert set(df["tensor"]) == set(names)
    v = {(r.step, r.tensor, r.metric): r.value for r in df.itertuples()}
    for name in names:
        b = base[name].double().numpy()
        ws = [s[name].double().numpy() for s in states]
        final = _ref_masks(b, ws[-1])
        prev = b
        for step, w in zip(STEPS, ws):
            cur, cons = _ref_masks(b, w), _ref_masks(prev, w)
            for c in ("abs_1e-5", "exact"):
                assert v[(step, name, f"sparsity_consec_{c}")] == pytest.approx(1 - cons[c].mean(), abs=1e-12)
                assert v[(step, name, f"density_{c}")] == pytest.approx(cur[c].mean(), abs=1e-12)
                out = (cur[c] & ~final[c]).sum() / cur[c].sum()
                assert v[(step, name, f"outside_final_{c}")] == pytest.approx(out, abs=1e-12)
                sout = (cons[c] & ~final[c]).sum() / cons[c].sum()
                assert v[(step, name, f"step_outside_final_{c}")] == pytest.approx(sout, abs=1e-12)
            d = (w - b).astype(np.float32).astype(np.float64)
            assert v[(step, name, "delta_fro")] == pytest.approx(np.linalg.norm(d), rel=1e-9)
            if d.ndim == 2:
                dT = (ws[-1] - b).astype(np.float32).astype(np.float64)
                vt, vT = _ref_v(d, K), _ref_v(dT, K)
                sim = np.linalg.norm(vt.T @ vT) ** 2 / K
                assert v[(step, name, f"sim_k{K}")] == pytest.approx(sim, abs=1e-7)
                sig = np.linalg.svd(d, compute_uv=False)
                assert v[(step, name, "stable_rank")] == pytest.approx((sig ** 2).sum() / sig[0] ** 2, rel=1e-9)
                lam = np.sort(sig[sig > 1e-6 * sig[0]] ** 2)[::-1]
                k = max(2, math.ceil(0.1 * len(lam)))
                alpha = 1 + k / np.log(lam[:k] / lam[k]).sum()
                assert v[(step, name, "hill_alpha_10pct")] == pytest.approx(alpha, rel=1e-6)
            prev = w
    # the final step locks onto itself; the transient updates of step 1 show up outside the final mask
    sims = df[df.metric == f"sim_k{K}"]
    np.testing.assert_allclose(sims[sims.step == STEPS[-1]]["value"], 1.0, atol=1e-9)
    out1 = df[(df.metric == "outside_final_exact") & (df.step == STEPS[0])]["value"]
    assert (out1 > 0).all()


def test_per_step_runs_and_views(traj):
    root, base, states, db, res = traj
    store = Store(db)
    runs = store.runs().set_index("run_id")
    for s in STEPS:
        assert runs.loc[f"grpo@{s}", "trajectory"] == "grpo" and runs.loc[f"grpo@{s}", "step"] == s
        assert runs.loc[f"grpo@{s}", "status"] == "done"
    t = trajectories(store)
    assert t.iloc[0]["trajectory"] == "grpo" and t.iloc[0]["n_steps"] == 3 and bool(t.iloc[0]["has_metrics"])
    by = trajectory_by_module(store, "grpo", Selection(), "sparsity_consec_exact")
    assert set(by["step"]) == set(STEPS) and by["sparsity_consec_exact"].between(0, 1).all()
    for spec in figures_for("trajectory"):
        for ctx in (AcrossContext(trajectory="grpo", criterion="abs_1e-5"), AcrossContext(metric="stable_rank")):
            fig, data = spec.build(store, Selection(), ctx)
            assert_valid(fig)
            assert not (fig.layout.meta or {}).get("empty"), spec.key
            assert not data.empty


def test_resume_and_changed_options(traj):
    root, base, states, db, _ = traj
    store = Store(db)
    before = store.query("SELECT * FROM trajectory ORDER BY tensor, step, metric")
    cks = find_checkpoints([root / "run"])
    res = run_trajectory(TrajectorySpec(base=root / "base", checkpoints=cks, name="grpo", method="RL", db=db,
                                        options=OPTS, k=K), progress=False)
    after = store.query("SELECT * FROM trajectory ORDER BY tensor, step, metric")
    assert res["n_tensors"] == len(base) and before.equals(after)
    with pytest.raises(OptionsError, match="other steps or options"):
        run_trajectory(TrajectorySpec(base=root / "base", checkpoints=cks[:2], name="grpo", method="RL", db=db,
                                      options=OPTS, k=K), progress=False)


def test_pure_helpers():
    rng = np.random.default_rng(0)
    lam = rng.pareto(2.0, 400) + 1
    k = 40
    s = np.sort(lam)[::-1]
    assert hill_alpha(lam, 0.1) == pytest.approx(1 + k / np.log(s[:k] / s[k]).sum())
    assert math.isnan(hill_alpha(np.array([1.0, 1.0])))
    # wide and tall Δ give the right singular vectors of Δ (float64 SVD reference)
    for shape in ((40, 12), (12, 40)):
        wb = torch.randn(*shape)
        wt = wb + torch.randn(*shape) * 0.1
        sp = delta_spectrum(wb, wt, 3, exact=True)
        d = (wt - wb).double().numpy()
        u, sig, vt = np.linalg.svd(d, full_matrices=False)
        np.testing.assert_allclose(sp.sigma, sig, rtol=1e-9, atol=1e-12)
        assert subspace_sim(sp.v, torch.from_numpy(vt[:3].T.copy()), 3) == pytest.approx(1.0, abs=1e-9)
    q = torch.linalg.qr(torch.randn(30, 4, dtype=torch.float64))[0]
    assert subspace_sim(q, q, 4) == pytest.approx(1.0)
    assert subspace_sim(q[:, :2], q[:, 2:], 2) == pytest.approx(0.0, abs=1e-12)


def test_cli_trajectory_parses(tmp_path):
    parser = argparse.ArgumentParser()
    across.register(parser.add_subparsers())
    args = parser.parse_args(["trajectory", "--db", str(tmp_path / "x.duckdb"), "B", "c1", "c2", "--steps", "1", "2",
                              "--name", "n", "--method", "RL", "--k", "8"])
    assert args.k == 8 and args.steps == [1, 2] and args.checkpoints == ["c1", "c2"]
    assert args.func.__name__ == "trajectory_main"
