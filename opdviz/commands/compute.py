"""``opdviz compute BASE POST [POST ...]``: analyse post-trained checkpoints against their base.

Flags for the analysis options are generated from ``opdviz.options.AnalysisOptions`` so the CLI,
the dashboard form and the README stay in step.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import OptionsError
from ..executors import add_executor_flags, make_executor
from ..options import AnalysisOptions

DEFAULT_DB = "data/opdviz.duckdb"


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per AnalysisOptions field (``--abs-eps 1e-6 1e-5``, ``--split-fused/--no-split-fused``)."""
    group = parser.add_argument_group("analysis options")
    for f in dataclasses.fields(AnalysisOptions):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"] + f" (default: {f.default!r})"
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif isinstance(f.default, tuple):
            elem = type(f.default[0]) if f.default else float
            group.add_argument(flag, nargs="+", type=elem, default=f.default, metavar=f.name.upper(), help=help_)
        else:
            group.add_argument(flag, type=type(f.default), default=f.default, choices=f.metadata.get("choices"),
                               help=help_)


def options_from_args(args: argparse.Namespace) -> AnalysisOptions:
    return AnalysisOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AnalysisOptions)})


def register(sub) -> None:
    p = sub.add_parser("compute", help="analyse post-trained checkpoints against their base and store the results",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="base checkpoint: .safetensors file, or HF folder (sharded or not)")
    p.add_argument("post", nargs="+", help="post-trained checkpoint(s) of the same base")
    p.add_argument("--method", nargs="+", default=None, metavar="LABEL",
                   help="method label per post-trained checkpoint (OPD, RL, SFT, DPO…); one label applies to all")
    p.add_argument("--name", nargs="+", default=None, metavar="NAME",
                   help="run name per post-trained checkpoint (default: the checkpoint's folder name)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    p.add_argument("--overwrite", action="store_true", help="replace stored runs of the same name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_executor_flags(p)
    add_option_flags(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..job import JobSpec, run_jobs
    from ..threads import apply_threads

    apply_threads(args.threads)
    opts = options_from_args(args)
    posts = [Path(x) for x in args.post]
    names = args.name or [_default_name(x) for x in posts]
    methods = args.method or ["post-trained"]
    if len(names) != len(posts):
        raise OptionsError(f"--name got {len(names)} names for {len(posts)} post-trained checkpoints")
    if len(methods) == 1:
        methods = methods * len(posts)
    if len(methods) != len(posts):
        raise OptionsError(f"--method got {len(methods)} labels for {len(posts)} post-trained checkpoints")
    if len(set(names)) != len(names):
        raise OptionsError("run names must differ: pass --name NAME1 NAME2 …")
    executor = make_executor(args.executor, ray_address=args.ray_address,
                             ray_gpus_per_task=args.ray_gpus_per_task,
                             ray_cpus_per_task=args.ray_cpus_per_task)
    specs = [JobSpec(base=Path(args.base), post=post, run_id=name, method=method, db=Path(args.db), options=opts)
             for post, name, method in zip(posts, names, methods)]
    # one job for all runs: local reads and decomposes each base tensor once for every post; ray: one pool
    for group in [specs]:
        rows = run_jobs(group, progress=not args.no_progress, overwrite=args.overwrite, executor=executor)
        for spec, row in zip(group, rows):
            print(f"{spec.run_id}: {row['status']} — {row['n_done']} tensors ({row['n_skipped']} skipped, "
                  f"{row['n_failed']} failed) in {row['wall_s']:.1f} s → {args.db}")
    return 0


def _default_name(path: Path) -> str:
    path = path.resolve()
    return path.stem if path.is_file() else path.name
