"""``opdviz demo``: open the dashboard on the built-in demo at once, computing what is missing behind it.

The demo checkpoints ship in ``data/demo/`` (regenerate them with ``opdviz lab``): one tiny Llama
student base and its OPD, RL (GRPO) and SFT post-trained versions at lr 1e-4 with fp32 master weights
(``opd/``, ``rl/``, ``sft/``), and the same methods in the sparse regime, weights in bf16 throughout at a
lower rate (``sparse/*``). On first run the dashboard starts immediately while one background process
computes, with the normal job, the final runs first (each appears when it is done; running ones show
their progress), then each run's intermediate checkpoints as a trajectory, then the mask overlaps.
Later runs find the results in the store and compute nothing. ``--no-serve`` computes in the foreground.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from opdviz.errors import OpdvizError
from opdviz.cli.compute import DEFAULT_DB

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "data" / "demo"
RUNS = (("opd", "OPD"), ("rl", "RL"), ("sft", "SFT"))
SPARSE = "sparse"      # data/demo/sparse/<method>/: the sparse-regime runs (opdviz.lab.sweep.sparse_points)


def register(sub) -> None:
    p = sub.add_parser("demo", help="compute the built-in demo (first run only) and start the dashboard",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=str(ROOT / DEFAULT_DB), help="store to fill and open (default: data/opdviz.duckdb)")
    p.add_argument("--demo-dir", default=str(DEMO_DIR), help="demo checkpoints (default: data/demo)")
    p.add_argument("--port", type=int, default=8501, help="dashboard port (default: 8501)")
    p.add_argument("--no-serve", action="store_true",
                   help="compute the demo database in the foreground only; do not start the dashboard")
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


def sparse_runs(demo_dir: Path) -> list[tuple[str, str, Path]]:
    """(run name, method label, folder) of the sparse-regime runs present under ``demo_dir/sparse``; the
    name carries the settings that made the run sparse, e.g. ``demo-opd-bf16-lr3e-05``."""
    runs = []
    for sub, label in RUNS:
        folder = demo_dir / SPARSE / sub
        meta = _metrics(folder)           # confined and capped, like every checkpoint file
        try:
            name = f"demo-{sub}-{meta['precision']}-lr{float(meta['lr']):g}"
        except (ValueError, KeyError, TypeError):
            continue
        if (folder / "model.safetensors").exists():
            runs.append((name, label, folder))
    return runs


def compute_demo(db: Path, demo_dir: Path, progress: bool = True, log=print) -> None:
    """Compute every demo result the store does not hold complete yet (resuming partial ones), in this
    process: the final runs (today's and the sparse regime's), then trajectories, then overlaps."""
    from opdviz.engine.runner import JobSpec, run_job
    from opdviz.store import Store

    base = demo_dir / "base"
    runs = demo_runs(demo_dir)
    if not base.exists() or not runs:
        raise OpdvizError(f"no demo checkpoints under {demo_dir}; regenerate them with "
                          f"`opdviz lab --out {demo_dir}` (about 10 minutes on 2 CPU cores).")
    store = Store(db)
    store.check()          # before any work: a foreign or broken --db is refused untouched
    for name, label, post in runs + sparse_runs(demo_dir):
        row = store.run_row(name) if store.exists() else None
        if row is not None and row.get("status") == "done":
            continue
        log(f"computing demo run {name} ({label}: {post.relative_to(demo_dir)} vs base) → {db}")
        run_job(JobSpec(base=base, post=post, run_id=name, method=label, db=db), progress=progress, log=log)
    compute_across(store, db, demo_dir, runs, progress=progress, log=log)


def compute_across(store, db: Path, demo_dir: Path, runs: list[tuple[str, str, Path]], progress: bool = True,
                   log=print) -> None:
    """Trajectories (the intermediate checkpoints plus the final one of each run) and the mask
    overlap of every pair of methods — the demo's data for the Trajectory and Overlap pages."""
    from opdviz.engine.overlap import OverlapSpec, run_overlap
    from opdviz.engine.trajectory import TrajectorySpec, run_trajectory
    from opdviz.store.progress import overlap_pairs, trajectory_names

    base = demo_dir / "base"
    have_traj = trajectory_names(store)
    for name, label, post in runs:
        traj = f"{name}-traj"
        steps = _checkpoints(post)
        if traj in have_traj or len(steps) < 2:
            continue
        log(f"computing demo trajectory {traj} ({len(steps)} checkpoints)")
        run_trajectory(TrajectorySpec(base=base, checkpoints=tuple(steps), name=traj, method=label, db=db),
                       progress=progress, log=log)
    have = overlap_pairs(store)
    for i, (a, _, pa) in enumerate(runs):
        for b, _, pb in runs[i + 1:]:
            if (a, b) in have:
                continue
            log(f"computing demo overlap {a} ∩ {b}")
            run_overlap(OverlapSpec(base=base, a=pa, b=pb, run_a=a, run_b=b, db=db), progress=progress)


def _metrics(folder: Path) -> dict:
    """The trainer's ``metrics.json`` in ``folder`` (confined and capped like every checkpoint file), or {}."""
    from opdviz.io.safefiles import Limits, read_json

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


def demo_complete(db: Path, demo_dir: Path) -> bool:
    """Whether the store holds every demo run (done), trajectory and overlap: nothing left to compute."""
    from opdviz.store import Store
    from opdviz.store.progress import overlap_pairs, trajectory_names

    store = Store(db)
    if not store.exists():
        return False
    runs = demo_runs(demo_dir)
    for name, _, _ in runs + sparse_runs(demo_dir):
        row = store.run_row(name)
        if row is None or row.get("status") != "done":
            return False
    have_traj = trajectory_names(store)
    if any(f"{n}-traj" not in have_traj for n, _, post in runs if len(_checkpoints(post)) >= 2):
        return False
    have = overlap_pairs(store)
    return all((a, b) in have for i, (a, _, _) in enumerate(runs) for b, _, _ in runs[i + 1:])


def main(args: argparse.Namespace) -> int:
    db, demo_dir = Path(args.db), Path(args.demo_dir)
    # OpenMP threads that spin while waiting starve each other on a shared machine (DESIGN.md)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.no_serve:
        compute_demo(db, demo_dir)
        print(f"demo database ready: {db}")
        return 0
    if not (demo_dir / "base").exists() or not demo_runs(demo_dir):
        compute_demo(db, demo_dir)        # raises the error that says how to regenerate the checkpoints
    worker = None
    if not demo_complete(db, demo_dir):
        # the dashboard opens now; the runs appear in it as this background process finishes them
        print("computing the demo in the background (final runs first, then trajectories and overlaps); "
              "the dashboard shows each run as it finishes", flush=True)
        worker = subprocess.Popen([sys.executable, "-m", "opdviz.cli", "demo", "--no-serve", "--db", str(db),
                                   "--demo-dir", str(demo_dir)], env=os.environ.copy(), cwd=ROOT)
    print(f"starting the dashboard on http://localhost:{args.port} (Ctrl+C to stop)", flush=True)
    env = {**os.environ, "OPDVIZ_DB": str(db.resolve())}
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(args.port),
           "--server.headless", "true"]
    try:
        return subprocess.call(cmd, env=env, cwd=ROOT)
    except KeyboardInterrupt:
        return 0
    finally:
        if worker is not None and worker.poll() is None:
            # stopping the dashboard stops the computation too; the next `opdviz demo` resumes it
            worker.terminate()
            worker.wait(timeout=30)
