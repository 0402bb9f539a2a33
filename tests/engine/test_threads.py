"""Threads on a shared machine: passive OpenMP waiting before torch starts, a thread count the user sets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from opdviz.errors import OptionsError
from opdviz.engine import worker
from opdviz.engine.threads import THREADS_ENV, available_cores, child_env, choose_threads


def test_thread_count_flag_then_env_then_affinity(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert choose_threads() == available_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(THREADS_ENV, "3")
    assert choose_threads() == 3
    assert choose_threads(1) == 1                      # --threads wins over the variable
    for bad in ("zero", "1.5"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(OptionsError, match=THREADS_ENV):
            choose_threads()
    with pytest.raises(OptionsError, match="≥ 1"):
        choose_threads(0)


def test_children_wait_passively_unless_the_operator_chose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert child_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    assert worker.child_env()["OMP_WAIT_POLICY"] == "PASSIVE"        # the dashboard's compute children
    assert "OMP_WAIT_POLICY" not in os.environ                  # only the child's copy changes
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert child_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_cli_sets_the_policy_before_torch_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    # stop right where the subcommands (which import torch) would be loaded, and report
    probe = ("import os, sys; from opdviz import cli\n"
             "def stop():\n"
             "    print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY')); raise SystemExit(0)\n"
             "cli.build_parser = stop\n"
             "cli.main([])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "PASSIVE"]


def test_compute_applies_threads(tmp_path, llama_pair):
    base, post = llama_pair
    probe = ("import sys, torch; from opdviz import cli; import opdviz.cli.compute as c\n"
             "real = c.main\n"
             "def main(args):\n"
             "    rc = real(args); print('threads', torch.get_num_threads()); return rc\n"
             "c.main = main\n"
             "sys.exit(cli.main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", probe, "compute", str(base), str(post), "--name", "t",
                          "--db", str(tmp_path / "t.duckdb"), "--no-progress", "--threads", "1",
                          "--include", "layers.0.mlp.down"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "threads 1" in out.stdout
