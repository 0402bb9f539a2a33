"""``opdviz figures``: write the dashboard's figures as paper-ready files, each with its data as CSV.

    opdviz figures --db data/opdviz.duckdb --out figs --format pdf
    opdviz figures --run opd-7b --run rl-7b --page sparsity --criterion abs_1e-6 --width double --out figs
    opdviz figures --list            # the figure names (also opdviz.figure_names(), store.figure(name))

Static formats (pdf, svg, png) are sized for a paper column (``--width single`` ≈ 3.3 in, ``double``
≈ 6.9 in, 8–9 pt text) and need Chromium (Debian's ``chromium`` package); ``html`` is interactive
and opens offline (plotly.js inlined).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import OptionsError, StoreError
from ..options import DEFAULT_CRITERIA
from .compute import DEFAULT_DB

CRITERIA = DEFAULT_CRITERIA
PAGES = ("overview", "sparsity", "spectra", "geometry", "tensor", "compare")


def register(sub) -> None:
    p = sub.add_parser("figures", help="export figures (pdf/png/svg/html) and their data for a paper",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    p.add_argument("--run", action="append", default=None, metavar="NAME",
                   help="include this run (repeat for several; default: every run)")
    p.add_argument("--list", action="store_true",
                   help="print the name of every figure (as opdviz.figure_names() returns them) and exit")
    p.add_argument("--out", default=None, help="output folder (created if missing; required unless --list)")
    p.add_argument("--format", choices=("pdf", "png", "svg", "html"), default="pdf", help="figure format (default: pdf)")
    p.add_argument("--page", action="append", choices=PAGES, default=None,
                   help="only this dashboard page's figures (repeatable; default: every page)")
    p.add_argument("--criterion", choices=CRITERIA, default="abs_1e-5",
                   help="what counts as a changed entry (default: abs_1e-5, i.e. |ΔW| > 1e-5)")
    p.add_argument("--width", choices=("single", "double"), default="single",
                   help="paper column width of static figures (default: single, ≈ 3.3 in)")
    p.add_argument("--tensor", default=None, help="tensor for the tensor page (default: the largest matrix)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.list:
        from ..api import figure_names

        print("\n".join(figure_names()))
        return 0
    if not args.out:
        raise OptionsError("--out FOLDER is required (or --list to see the figure names)")
    from ..figexport import export_figures
    from ..queries import Selection, runs
    from ..store import Store
    from ..views import ViewContext

    store = Store(args.db)
    if not store.exists():
        raise StoreError(f"no results at {args.db}: run `opdviz demo` for an example store, or "
                         f"`opdviz compute BASE POST --db {args.db}` to analyse your checkpoints first.")
    known = list(runs(store)["run_id"])
    if not known:
        raise StoreError(f"{args.db} holds no runs yet: run `opdviz compute BASE POST --db {args.db}` "
                         "(or `opdviz demo`) first.")
    wanted = tuple(args.run or ())
    missing = [r for r in wanted if r not in known]
    if missing:
        raise OptionsError(f"no run named {', '.join(map(repr, missing))} in {args.db}; runs: {', '.join(known)}")
    skipped: list[str] = []
    paths = export_figures(store, Selection(runs=wanted), ViewContext(criterion=args.criterion, tensor=args.tensor),
                           Path(args.out), fmt=args.format, pages=args.page, width=args.width,
                           on_skip=lambda key, why: skipped.append(f"{key} ({why})"))
    for path in paths:
        print(f"wrote {path}")
    if skipped:
        print(f"skipped {len(skipped)} figure(s) without data: {', '.join(skipped)}")
    if not paths:
        raise OptionsError("no figure had data for this selection; check --run / --page, or that the runs "
                           "have finished tensors (`opdviz runs --db …`).")
    n_fig = sum(1 for p in paths if p.suffix == f".{args.format}")
    print(f"{n_fig} figures in {args.format} + data (CSV) → {args.out}")
    return 0
