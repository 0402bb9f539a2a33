"""``opdviz batch FILE.yaml|json --db PATH``: many analyses (bases, post-trained checkpoints, trajectories,
options) from one file, validated up front and run as one job — with ``--executor ray``, spread over a
Ray cluster in one pool of tasks. The file format is in ``opdviz.engine.batch`` and the README.
"""

from __future__ import annotations

import argparse

from opdviz.engine.executors import add_executor_flags, make_executor
from opdviz.io.hub import add_download_flag
from opdviz.cli.compute import DEFAULT_DB


def register(sub) -> None:
    p = sub.add_parser("batch", help="run the analyses listed in a YAML/JSON file as one job (optionally on Ray)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="batch file (.yaml, .yml or .json)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    p.add_argument("--overwrite", action="store_true", help="replace stored runs of the same name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--check", action="store_true", help="only validate the file and list the runs")
    add_download_flag(p)
    add_executor_flags(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from opdviz.engine.batch import load_batch, run_batch

    batch = load_batch(args.file, args.db, download=args.download)
    if args.check:
        for s in batch.specs:
            print(f"{s.run_id}\t{s.method}\t{s.base}\t{s.post}")
        print(f"{args.file}: {len(batch.specs)} runs, {len(batch.trajectories)} trajectories — ok")
        return 0
    from opdviz.engine.threads import apply_threads

    apply_threads(args.threads)
    executor = make_executor(args.executor, ray_address=args.ray_address, ray_gpus_per_task=args.ray_gpus_per_task,
                             ray_cpus_per_task=args.ray_cpus_per_task)
    rows = run_batch(batch, executor=executor, progress=not args.no_progress, overwrite=args.overwrite)
    for spec, row in zip(batch.specs, rows):
        print(f"{spec.run_id}: {row['status']} — {row['n_done']} tensors ({row['n_skipped']} skipped, "
              f"{row['n_failed']} failed) in {row['wall_s']:.1f} s → {args.db}")
    for traj in batch.trajectories:
        print(f"trajectory {traj.name}: steps {[s for s, _ in traj.checkpoints]} → {args.db}")
    return 0
