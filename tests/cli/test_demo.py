"""The shipped demo: its layout is what `opdviz demo` expects."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from opdviz.cli.demo import DEMO_DIR, _checkpoints, demo_complete, demo_runs, sparse_runs
from opdviz.lab.sweep import DEMO_SPARSE
from opdviz.io.reader import Checkpoint, plan_pairs


def test_shipped_demo_has_three_methods_from_one_base():
    runs = demo_runs(DEMO_DIR)
    assert [(n, m) for n, m, _ in runs] == [("demo-opd", "OPD"), ("demo-rl", "RL"), ("demo-sft", "SFT")]
    base = Checkpoint.open(DEMO_DIR / "base")
    for _, _, post in runs:
        items = plan_pairs(base, Checkpoint.open(post))
        assert items and all(i.status == "ok" for i in items)
        meta = json.loads((post / "metrics.json").read_text())
        assert 0 <= meta["accuracy"] <= 1 and 0 <= meta["base_accuracy"] <= 1


def test_trajectory_steps_end_at_the_final_checkpoint():
    for _, _, post in demo_runs(DEMO_DIR):
        steps = _checkpoints(post)
        assert len(steps) >= 6
        assert [t for t, _ in steps] == sorted(t for t, _ in steps)
        assert steps[-1][1] == post


def test_shipped_sparse_regime_is_sparse_and_improves():
    """The sparse/ runs: named by their settings, most coordinates bit-identical to the base (counted here
    on the raw bf16 bits), accuracy above the base by more than two standard errors of 500 problems."""
    runs = sparse_runs(DEMO_DIR)
    assert [(n, m) for n, m, _ in runs] == [("demo-opd-bf16-lr3e-05", "OPD"), ("demo-rl-bf16-lr3e-05", "RL"),
                                            ("demo-sft-bf16-lr3e-05", "SFT")]
    base = load_file(str(DEMO_DIR / "base" / "model.safetensors"))
    for (_, _, post), point in zip(runs, DEMO_SPARSE):
        meta = json.loads((post / "metrics.json").read_text())
        assert (meta["lr"], meta["precision"], meta["weight_decay"], meta["steps"]) == \
            (point.lr, point.precision, point.weight_decay, point.steps)
        w = load_file(str(post / "model.safetensors"))
        same = sum(int((base[k].view(torch.int16) == w[k].view(torch.int16)).sum()) for k in base)
        assert same / sum(v.numel() for v in base.values()) > 0.5
        p = meta["base_accuracy"]
        assert meta["accuracy"] > p + 2 * (p * (1 - p) / 500) ** 0.5


def test_an_empty_store_is_not_a_complete_demo(tmp_path):
    assert not demo_complete(tmp_path / "none.duckdb", DEMO_DIR)
