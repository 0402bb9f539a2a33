"""Base work once: several posts of one base in one job give exactly the results of each pair alone.

The job iterates base tensors and, for each, every post that has it; the base's elementwise prepass,
its factorization and the principal-coverage reconstructions are shared (``opdviz.engine.analyse.analyse_items``,
``opdviz.metrics.geometry.principal_coverage``). These tests compare, bit for bit, every stored metric
and array of a 3-post job with three 1-post jobs, including fused tensors split into parts and
matrices large enough for the histogram selection, and the coverage counts of several masks at once
with each mask alone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import factory
from opdviz.engine import analyse
from opdviz.engine.basecache import cache_root
from opdviz.metrics import geometry
from opdviz.engine.local import LocalExecutor
from opdviz.engine.runner import JobSpec, run_jobs
from opdviz.metrics.pair import analyse_pair, base_work
from opdviz.io.reader import Checkpoint
from opdviz.metrics.geometry import linalg_base, principal_coverage
from opdviz.metrics.topk_coverage import SMALL_SELECT
from opdviz.options import AnalysisOptions
from opdviz.store import Store

# big enough that the FFN and embedding matrices (≥ 49152 entries) take the histogram selection
# and the vocabulary matrices tall enough (m ≥ 8n + 8) for their factors to enter the base cache
CFG = factory.llama_config(layers=1, hidden=128, ffn=384, heads=4, kv_heads=2, vocab=1100)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base with a fused qkv tensor and three post-trained checkpoints of it (different updates)."""
    root = tmp_path_factory.mktemp("family")
    base = factory.make_llama_state(CFG, seed=3)
    p = "model.layers.0.self_attn."
    base[p + "qkv_proj.weight"] = torch.cat([base.pop(p + "q_proj.weight"), base.pop(p + "k_proj.weight"),
                                             base.pop(p + "v_proj.weight")])
    cfg = {**CFG, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}
    b = factory.save_checkpoint(base, root / "base", shards=2, config=cfg)
    posts = [factory.save_checkpoint(factory.post_train(base, seed=10 + i, density=0.1 + 0.2 * i),
                                     root / f"post{i}", shards=1 + i, config=cfg) for i in range(3)]
    return b, posts


def _results(db, run: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    st = Store(db)
    m = st.query("SELECT tensor, metric, value FROM metrics WHERE run_id = ? ORDER BY tensor, metric", [run])
    a = st.query("SELECT tensor, name, values FROM arrays WHERE run_id = ? ORDER BY tensor, name", [run])
    t = st.query("SELECT tensor, parent, part, status, spectrum_exact FROM tensors WHERE run_id = ? "
                 "ORDER BY tensor", [run])
    return m, a, t


def _same(left, right) -> None:
    for x, y in zip(left, right):
        assert list(x.columns) == list(y.columns) and len(x) == len(y)
        for col in x.columns:
            for u, v in zip(x[col], y[col]):
                if isinstance(u, (list, np.ndarray)):
                    np.testing.assert_array_equal(np.asarray(u, dtype=float), np.asarray(v, dtype=float))
                elif pd.isna(u):
                    assert pd.isna(v), (col, u, v)
                else:
                    assert u == v, (col, u, v)


def _specs(base, posts, db, names, **opts):
    return [JobSpec(base=base, post=p, run_id=n, method="OPD", db=db, options=AnalysisOptions(**opts))
            for p, n in zip(posts, names)]


def test_three_posts_together_equal_each_alone(family, tmp_path, monkeypatch):
    base, posts = family
    together, alone = tmp_path / "together.duckdb", tmp_path / "alone.duckdb"
    names = ["p0", "p1", "p2"]
    ex = LocalExecutor()
    rows = run_jobs(_specs(base, posts, together, names), progress=False, executor=ex)
    assert [r["status"] for r in rows] == ["done"] * 3
    assert {"read", "elementwise", "base_decomposition", "update_decomposition", "geometry"} <= set(ex.stages)
    for spec in _specs(base, posts, alone, names):
        assert run_jobs([spec], progress=False)[0]["status"] == "done"
    for n in names:
        got, ref = _results(together, n), _results(alone, n)
        assert (ref[2]["status"] == "ok").all() and (ref[2]["part"] != "").any()   # fused parts analysed
        assert ref[0]["metric"].str.startswith("principal_coverage").any()
        _same(got, ref)
    # the posts differ, so sharing did not leak one post's results into another
    m0, m2 = _results(together, "p0")[0], _results(together, "p2")[0]
    assert not np.array_equal(m0["value"].to_numpy(), m2["value"].to_numpy())

    # coverage in batches of one post (the memory cap) gives the same numbers again
    monkeypatch.setattr(analyse, "COVERAGE_BATCH_BYTES", 1)
    small = tmp_path / "batched.duckdb"
    run_jobs(_specs(base, posts, small, names), progress=False)
    for n in names:
        _same(_results(small, n), _results(alone, n))


@pytest.mark.parametrize("shape", [(300, 128), (128, 300), (20, 30)])
def test_principal_coverage_of_several_masks_equals_each_alone(shape):
    g = torch.Generator().manual_seed(7)
    wb = torch.randn(shape, generator=g).to(torch.bfloat16)
    opts = AnalysisOptions()
    base = linalg_base(wb, opts)
    codes = []
    for density in (0.05, 0.3, 0.7):
        wp = (wb.float() + 1e-2 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density))
        res = analyse_pair(wb, wp.to(torch.bfloat16), opts, matrix=True, base=base_work(wb, opts, matrix=True),
                           coverage=False)
        codes.append(res.code)
    assert (shape[0] * shape[1] > SMALL_SELECT) == (shape != (20, 30))
    together = principal_coverage(wb, base, codes, opts)
    for code, got in zip(codes, together):
        assert got == principal_coverage(wb, base, [code], opts)[0]
    assert together[0] != together[2]


def test_analyse_pair_with_shared_base_is_identical():
    g = torch.Generator().manual_seed(1)
    wb = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    wp = (wb.float() + 1e-3 * torch.randn(96, 64, generator=g)).to(torch.bfloat16)
    opts = AnalysisOptions()
    alone = analyse_pair(wb, wp, opts, matrix=True)
    shared = analyse_pair(wb, wp, opts, matrix=True, base=base_work(wb, opts, matrix=True))
    assert alone.scalars.keys() == shared.scalars.keys()
    for k, v in alone.scalars.items():
        assert v == shared.scalars[k] or (np.isnan(v) and np.isnan(shared.scalars[k])), k
    for k, v in alone.arrays.items():
        np.testing.assert_array_equal(v, shared.arrays[k])


def test_a_later_job_reuses_the_base_cache(family, tmp_path, monkeypatch):
    base, posts = family
    db = tmp_path / "c.duckdb"
    calls: list[tuple] = []
    real = geometry.linalg_base
    monkeypatch.setattr(geometry, "linalg_base", lambda wb, opts: calls.append(tuple(wb.shape)) or real(wb, opts))
    run_jobs(_specs(base, posts[:1], db, ["first"]), progress=False)
    files = sorted(p.name for p in cache_root(db).rglob("*.safetensors"))
    # within the budget (the base's bytes, 0.96 MB) the tallest group fits whole, the vocabulary
    # matrices (1100×128: 2 × 263 KB), and of the next, the 384×128 FFN matrices, the first one
    assert len(files) == 3 and sum(f.startswith(("model.embed_tokens", "lm_head")) for f in files) == 2, files
    assert sum(p.stat().st_size for p in cache_root(db).rglob("*.safetensors")) <= Checkpoint.open(base).total_bytes
    first = list(calls)
    assert (1100, 128) in first
    calls.clear()
    run_jobs(_specs(base, posts[:1], db, ["second"]), progress=False)
    assert (1100, 128) not in calls and len(calls) == len(first) - 3          # the three came from the cache
    assert len(list(cache_root(db).rglob("*.safetensors"))) == 3              # the cap held: nothing added
    off = tmp_path / "off.duckdb"
    run_jobs(_specs(base, posts[:1], off, ["nocache"], base_cache=False), progress=False)
    assert not cache_root(off).exists()
    _same(_results(db, "second"), _results(off, "nocache"))
    _same(_results(db, "first"), _results(off, "nocache"))

    # an entry that holds another tensor's factors (same key, other bytes) is detected and not used
    emb, head = (next(cache_root(db).rglob(f"{p}*.safetensors")) for p in ("model.embed_tokens", "lm_head"))
    emb.write_bytes(head.read_bytes())
    calls.clear()
    run_jobs(_specs(base, posts[:1], db, ["third"]), progress=False)
    assert calls.count((1100, 128)) == 1
    _same(_results(db, "third"), _results(off, "nocache"))
    # a corrupt entry is ignored too
    emb.write_bytes(b"not a safetensors file")
    run_jobs(_specs(base, posts[:1], db, ["fourth"]), progress=False)
    _same(_results(db, "fourth"), _results(off, "nocache"))


def test_the_cache_keeps_the_tallest_matrices_within_the_base_bytes(tmp_path):
    from opdviz.engine.basecache import BaseCache, factor_bytes, keep_plan
    from opdviz.metrics.linalg import base_factors

    # Qwen2.5-0.5B, bf16: the vocabulary matrices, k/v and FFN are kept whole, then part of the square q/o
    h, f, kv, vocab, layers = 896, 4864, 128, 151936, 24
    shapes = [(vocab, h)] * 2 + [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)] * layers
    budget = sum(a * b for a, b in shapes) * 2
    plan = keep_plan(shapes, budget)
    assert plan[vocab / h] == 2 * factor_bytes((vocab, h)) and plan[7.0] == 48 * factor_bytes((kv, h))
    assert plan[f / h] == 72 * factor_bytes((f, h)) and 0 < plan[1.0] < 48 * factor_bytes((h, h))
    assert sum(plan.values()) == budget
    assert keep_plan(shapes, 0) == {} and keep_plan(shapes, 10 ** 12)[1.0] == 48 * factor_bytes((h, h))

    # the budget is a hard cap over every job's entries of this base
    opts = AnalysisOptions()
    wb = torch.randn(40, 8, dtype=torch.float64)
    factors = base_factors(wb, True, 0, 0)
    cache = BaseCache(tmp_path, "f" * 64, opts, "cpu", shapes=[(40, 8)] * 2, budget=2000)
    assert cache.save("a", wb, factors) and cache.used > 0
    assert not cache.save("b", wb, factors)                  # a second entry would pass 2000 bytes (one is ~1.3 KB)
    again = BaseCache(tmp_path, "f" * 64, opts, "cpu", shapes=[(40, 8)] * 2, budget=10 ** 6)
    assert again.used == cache.used and again.save("b", wb, factors)
    assert again.load("a", wb) is not None and again.load("b", wb) is not None
    # a square matrix is not kept when the budget goes to taller ones
    assert not BaseCache(tmp_path, "f" * 64, opts, "cpu", shapes=[(40, 8), (8, 8)], budget=1100).could_keep(
        torch.zeros(8, 8))
