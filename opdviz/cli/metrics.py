"""``opdviz metrics``: the stable export, one row per (tensor, metric); plus ``runs`` and ``fold``.

Export columns (a public contract): run, method, tensor, tower, layer, block, module, metric, value.
A thin call into ``opdviz.open(db).metrics(...)``: the CLI and the Python API return the same rows.

    opdviz metrics --db data/opdviz.duckdb --run opd --module q --module down --metric 'sparsity_*' -o q.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opdviz.errors import OptionsError, StoreError
from opdviz.options import finite_number
from opdviz.cli.compute import DEFAULT_DB


def register(sub) -> None:
    p = sub.add_parser("metrics", help="export stored metrics as CSV or Parquet (one row per tensor and metric)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    p.add_argument("--run", action="append", default=None, metavar="NAME",
                   help="only this run (repeat for several; default: every run)")
    p.add_argument("--method", action="append", default=None, metavar="LABEL",
                   help="only runs with this method label (repeatable)")
    p.add_argument("--tower", action="append", default=None, help="only this tower: text, vision (repeatable)")
    p.add_argument("--layer", action="append", default=None, type=_layers, metavar="N|A-B",
                   help="only this layer index, or the range A-B inclusive (repeatable); tensors without a layer "
                        "(embeddings, head, final norm) are then left out")
    p.add_argument("--block", action="append", default=None, help="only this block: attn, ffn, embed, head, norm… "
                                                                   "(repeatable)")
    p.add_argument("--module", action="append", default=None, help="only this module: q, k, v, o, gate, up, down… "
                                                                    "(repeatable)")
    p.add_argument("--metric", action="append", default=None, metavar="NAME",
                   help="only this metric, or a glob such as 'sparsity_*' (repeatable)")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    p.add_argument("-o", "--output", default=None, help="output file (default: CSV to standard output)")
    p.set_defaults(func=export_main)

    r = sub.add_parser("runs", help="list the runs in a store with their status and provenance")
    r.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    r.set_defaults(func=runs_main)

    f = sub.add_parser("fold", help="fold staged results into the .duckdb file (jobs do this themselves)")
    f.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    f.add_argument("--wait", type=finite_number(0), default=30.0, help="seconds to wait for the file lock")
    f.set_defaults(func=fold_main)


def _layers(text: str) -> list[int]:
    """``3`` → [3]; ``2-5`` → [2, 3, 4, 5]."""
    lo, sep, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a layer index or range A-B: {text!r}") from None
    if b < a:
        raise argparse.ArgumentTypeError(f"empty layer range {text!r}: write it low-high")
    return list(range(a, b + 1))


def _open(db: str):
    from opdviz.api import open

    return open(db)


def export_main(args: argparse.Namespace) -> int:
    from opdviz.views.csvsafe import to_csv

    if args.format == "parquet" and not args.output:
        raise OptionsError("--format parquet needs -o FILE")
    layers = sorted({n for group in args.layer or () for n in group}) or None
    df = _open(args.db).metrics(runs=args.run, methods=args.method, layers=layers, modules=args.module,
                                blocks=args.block, metrics=args.metric, towers=args.tower)
    if args.format == "parquet":
        df.to_parquet(args.output, index=False)
    else:           # text cells that a spreadsheet would run as formulas get a leading ' (opdviz.views.csvsafe)
        to_csv(df, args.output or sys.stdout)
    if args.output:
        print(f"wrote {len(df)} rows to {Path(args.output)}", file=sys.stderr)
    return 0


def runs_main(args: argparse.Namespace) -> int:
    df = _open(args.db).runs()
    cols = ["run_id", "method", "status", "n_done", "n_tensors", "n_skipped", "n_failed", "device", "wall_s",
            "post_path"]
    print(df[cols].to_string(index=False) if not df.empty else "no runs")
    for run_id, status, error in zip(df["run_id"], df["status"], df["error"]):
        if status != "done" and isinstance(error, str) and error:
            print(f"{run_id}: {status}: {error}")
    return 0


def fold_main(args: argparse.Namespace) -> int:
    from opdviz.store import Store

    store = Store(args.db)
    if not store.exists():
        raise StoreError(f"no results at {args.db}: run `opdviz demo`, or `opdviz compute BASE POST --db {args.db}` first.")
    store.check()          # never fold into a folder, an empty or a foreign file
    ok = store.fold(wait=args.wait)
    print("folded" if ok else f"{args.db} stayed locked for {args.wait:.0f} s; try again later")
    return 0 if ok else 1
