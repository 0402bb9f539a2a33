"""The ``opdviz`` command line. Run ``opdviz --help``.

Each subcommand lives in the module that owns its work and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed args, returns an exit code).
Errors of the library's own types are printed without a traceback (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from opdviz.errors import OpdvizError

# module paths of the subcommands, in the order ``--help`` lists them
COMMANDS = (
    "opdviz.cli.compute",
    "opdviz.cli.metrics",
    "opdviz.cli.figures",
    "opdviz.cli.demo",
    "opdviz.lab.command",
    "opdviz.cli.across",
    "opdviz.cli.jobs",
    "opdviz.cli.batch",
)


def build_parser() -> argparse.ArgumentParser:
    from opdviz.version import __version__

    parser = argparse.ArgumentParser(
        prog="opdviz",
        description="See how post-training changed a model's weights: compute, store, explore.")
    parser.add_argument("--version", action="version", version=f"opdviz {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for path in COMMANDS:
        importlib.import_module(path).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from opdviz.engine.threads import passive_wait

    passive_wait()             # before any subcommand imports torch: OpenMP reads it once, at start
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except OpdvizError as exc:
        print(f"opdviz {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"opdviz {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130

