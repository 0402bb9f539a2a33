"""``opdviz metrics``: the stable export, one row per (tensor, metric); plus ``runs`` and ``fold``.

Export columns (a public contract): run, method, tensor, tower, layer, block, module, metric, value.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import OptionsError, StoreError
from .compute import DEFAULT_DB

EXPORT_COLUMNS = ("run", "method", "tensor", "tower", "layer", "block", "module", "metric", "value")


def register(sub) -> None:
    p = sub.add_parser("metrics", help="export stored metrics as CSV or Parquet (one row per tensor and metric)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    p.add_argument("--run", default=None, help="only this run (default: every run)")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    p.add_argument("-o", "--output", default=None, help="output file (default: CSV to standard output)")
    p.set_defaults(func=export_main)

    r = sub.add_parser("runs", help="list the runs in a store with their status and provenance")
    r.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    r.set_defaults(func=runs_main)

    f = sub.add_parser("fold", help="fold staged results into the .duckdb file (jobs do this themselves)")
    f.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    f.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the file lock")
    f.set_defaults(func=fold_main)


def _store(db: str):
    from ..store import Store

    store = Store(db)
    if not store.exists():
        raise StoreError(f"no results at {db}: run `opdviz demo`, or `opdviz compute BASE POST --db {db}` first.")
    return store


def export_main(args: argparse.Namespace) -> int:
    from ..queries import export_rows

    store = _store(args.db)
    df = export_rows(store, args.run)
    if args.run is not None and df.empty:
        known = ", ".join(store.runs()["run_id"]) or "none"
        raise OptionsError(f"no metrics for run {args.run!r} in {args.db} (runs: {known})")
    df = df[list(EXPORT_COLUMNS)]
    df["layer"] = df["layer"].astype("Int64")
    if args.format == "parquet":
        if not args.output:
            raise OptionsError("--format parquet needs -o FILE")
        df.to_parquet(args.output, index=False)
    elif args.output:
        df.to_csv(args.output, index=False)
    else:
        df.to_csv(sys.stdout, index=False)
    if args.output:
        print(f"wrote {len(df)} rows to {Path(args.output)}", file=sys.stderr)
    return 0


def runs_main(args: argparse.Namespace) -> int:
    from ..queries import runs

    # a run left 'running' by a process that is gone reads 'interrupted'; n_done is what is stored
    df = runs(_store(args.db))
    cols = ["run_id", "method", "status", "n_done", "n_tensors", "n_skipped", "n_failed", "device", "wall_s",
            "post_path"]
    print(df[cols].to_string(index=False) if not df.empty else "no runs")
    for run_id, status, error in zip(df["run_id"], df["status"], df["error"]):
        if status != "done" and isinstance(error, str) and error:
            print(f"{run_id}: {status}: {error}")
    return 0


def fold_main(args: argparse.Namespace) -> int:
    store = _store(args.db)
    store.check()          # never fold into a folder, an empty or a foreign file
    ok = store.fold(wait=args.wait)
    print("folded" if ok else f"{args.db} stayed locked for {args.wait:.0f} s; try again later")
    return 0 if ok else 1
