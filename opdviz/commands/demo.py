"""``opdviz demo``: compute the built-in demo database (once) and open the dashboard on it.

The demo checkpoints ship in ``data/demo/`` (regenerate them with ``opdviz lab``): one tiny Llama
student base and its OPD, RL (GRPO) and SFT post-trained versions. On first run each pair is
computed by the normal job (``opdviz compute`` in a child process, with its progress bar), then each
run's intermediate checkpoints as a trajectory and the mask overlap of every pair of methods; later
runs find the results in the store and go straight to the dashboard.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..errors import OpdvizError
from .compute import DEFAULT_DB

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "data" / "demo"
RUNS = (("opd", "OPD"), ("rl", "RL"), ("sft", "SFT"))


def register(sub) -> None:
    p = sub.add_parser("demo", help="compute the built-in demo (first run only) and start the dashboard",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=str(ROOT / DEFAULT_DB), help="store to fill and open (default: data/opdviz.duckdb)")
    p.add_argument("--demo-dir", default=str(DEMO_DIR), help="demo checkpoints (default: data/demo)")
    p.add_argument("--port", type=int, default=8501, help="dashboard port (default: 8501)")
    p.add_argument("--no-serve", action="store_true", help="compute the demo database only; do not start the dashboard")
    p.set_defaults(func=main)


def demo_runs(demo_dir: Path) -> list[tuple[str, str, Path]]:
    """(run name, method label, post folder) for each demo run present; the base is ``demo_dir/base``."""
    runs = []
    for sub, label in RUNS:
        folder = demo_dir / sub
        if not (folder / "model.safetensors").exists() and not (folder / "model.safetensors.index.json").exists():
            continue
        label = _metrics(folder).get("method", label)
        runs.append((f"demo-{sub}", label, folder))
    return runs


def compute_demo(db: Path, demo_dir: Path) -> None:
    """Compute every demo run that the store does not hold complete yet (resuming partial ones)."""
    from ..store import Store

    base = demo_dir / "base"
    runs = demo_runs(demo_dir)
    if not base.exists() or not runs:
        raise OpdvizError(f"no demo checkpoints under {demo_dir}; regenerate them with "
                          f"`opdviz lab --out {demo_dir}` (about 10 minutes on 2 CPU cores).")
    store = Store(db)
    store.check()          # before any work: a foreign or broken --db is refused untouched
    for name, label, post in runs:
        row = store.run_row(name) if store.exists() else None
        if row is not None and row.get("status") == "done":
            continue
        print(f"computing demo run {name} ({label}: {post.relative_to(demo_dir)} vs base) → {db}", flush=True)
        cmd = [sys.executable, "-m", "opdviz.cli", "compute", str(base), str(post), "--name", name,
               "--method", label, "--db", str(db)]
        _call(cmd, name)
    compute_across(store, db, demo_dir, runs)


def compute_across(store, db: Path, demo_dir: Path, runs: list[tuple[str, str, Path]]) -> None:
    """Trajectories (the intermediate checkpoints plus the final one of each run) and the mask
    overlap of every pair of methods — the demo's data for the Trajectory and Overlap pages."""
    base = demo_dir / "base"
    have_traj = set(store.query("SELECT DISTINCT trajectory FROM trajectory")["trajectory"])
    for name, label, post in runs:
        traj = f"{name}-traj"
        if traj in have_traj:
            continue
        steps = _checkpoints(post)
        if not steps:
            continue
        print(f"computing demo trajectory {traj} ({len(steps)} checkpoints)", flush=True)
        _call([sys.executable, "-m", "opdviz.cli", "trajectory", str(base), *[str(p) for _, p in steps],
               "--steps", *[str(t) for t, _ in steps], "--name", traj, "--method", label, "--db", str(db)], traj)
    have_pairs = store.query("SELECT DISTINCT run_a, run_b FROM overlap")
    have = set(zip(have_pairs["run_a"], have_pairs["run_b"]))
    for i, (a, _, pa) in enumerate(runs):
        for b, _, pb in runs[i + 1:]:
            if (a, b) in have:
                continue
            print(f"computing demo overlap {a} ∩ {b}", flush=True)
            _call([sys.executable, "-m", "opdviz.cli", "overlap", "--db", str(db), "--base", str(base),
                   "--a", str(pa), "--b", str(pb), "--run-a", a, "--run-b", b], f"overlap {a} {b}")


def _metrics(folder: Path) -> dict:
    """The trainer's ``metrics.json`` in ``folder`` (confined and capped like every checkpoint file), or {}."""
    from ..safefiles import Limits, read_json

    try:
        data = read_json(folder, "metrics.json", Limits.from_env(), lenient=True)
    except (OpdvizError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _checkpoints(post: Path) -> list[tuple[int, Path]]:
    """(step, folder) of ``checkpoint-N`` folders, then the final checkpoint at its recorded step."""
    steps = []
    for folder in post.glob("checkpoint-*"):
        tail = folder.name.split("-")[-1]
        if tail.isdigit() and (folder / "model.safetensors").exists():
            steps.append((int(tail), folder))
    steps.sort()
    try:
        final = int(_metrics(post)["steps"])
    except (ValueError, KeyError, TypeError):
        final = None
    if final is not None and (not steps or final > steps[-1][0]):
        steps.append((final, post))
    return steps


def _call(cmd: list[str], what: str) -> None:
    rc = subprocess.call(cmd)
    if rc != 0:
        raise OpdvizError(f"computing {what} failed (exit {rc}); rerun `opdviz demo` to resume it.")


def main(args: argparse.Namespace) -> int:
    db, demo_dir = Path(args.db), Path(args.demo_dir)
    compute_demo(db, demo_dir)
    if args.no_serve:
        print(f"demo database ready: {db}")
        return 0
    print(f"starting the dashboard on http://localhost:{args.port} (Ctrl+C to stop)", flush=True)
    env = {**os.environ, "OPDVIZ_DB": str(db.resolve())}
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(args.port),
           "--server.headless", "true"]
    try:
        return subprocess.call(cmd, env=env, cwd=ROOT)
    except KeyboardInterrupt:
        return 0
