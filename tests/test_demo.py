"""The shipped demo: its layout is what `opdviz demo` expects."""

from __future__ import annotations

import json

from opdviz.commands.demo import DEMO_DIR, _checkpoints, demo_runs
from opdviz.reader import Checkpoint, plan_pairs


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
