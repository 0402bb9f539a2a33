"""``opdviz compute BASE POST [POST ...]``: analyse post-trained checkpoints against their base.

A thin call into ``opdviz.analyze`` (the Python API), which checks the arguments and runs the job.

Flags for the analysis options are generated from ``opdviz.options.AnalysisOptions`` so the CLI,
the dashboard form and the README stay in step.
"""

from __future__ import annotations

import argparse
import dataclasses

from opdviz.engine.executors import add_executor_flags, make_executor
from opdviz.io.hub import add_download_flag, prefetch
from opdviz.options import AnalysisOptions

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
    p.add_argument("base", help="base checkpoint: .safetensors file, HF folder (sharded or not), or a model ID "
                               "org/name[@revision] from the local Hugging Face cache")
    p.add_argument("post", nargs="+", help="post-trained checkpoint(s) of the same base: folders, model IDs, or "
                                           "PEFT LoRA adapter folders (adapter_config.json)")
    p.add_argument("--method", nargs="+", default=None, metavar="LABEL",
                   help="method label per post-trained checkpoint (OPD, RL, SFT, DPO…); one label applies to all")
    p.add_argument("--name", nargs="+", default=None, metavar="NAME",
                   help="run name per post-trained checkpoint (default: the checkpoint's folder name)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    p.add_argument("--overwrite", action="store_true", help="replace stored runs of the same name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_download_flag(p)
    add_executor_flags(p)
    add_option_flags(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from opdviz.api import analyze

    from opdviz.engine.threads import apply_threads

    apply_threads(args.threads)
    prefetch([args.base, *args.post], args.download)
    executor = make_executor(args.executor, ray_address=args.ray_address,
                             ray_gpus_per_task=args.ray_gpus_per_task,
                             ray_cpus_per_task=args.ray_cpus_per_task)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(AnalysisOptions)}
    device = options.pop("device")
    summaries = analyze(args.base, list(args.post), db=args.db, name=args.name, method=args.method or "post-trained",
                        device=device, overwrite=args.overwrite, progress=not args.no_progress, executor=executor,
                        **options)
    for summary in summaries:
        print(summary)
    return 0
