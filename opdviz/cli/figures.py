"""``opdviz figures``: write the dashboard's figures as paper-ready files, each with its data as CSV.

    opdviz figures --db data/opdviz.duckdb --out figs --format pdf
    opdviz figures --run opd-7b --run rl-7b --page sparsity --criterion abs_1e-6 --width double --out figs
    opdviz figures --list            # the figure names (also opdviz.figure_names(), store.figure(name))

Every page is covered (Overview … Compare, Overlap and Trajectory). Without ``--run``, the steps of
trajectories are left out as in the dashboard (``--with-steps`` keeps them). Next to the figures go
their data (one CSV each), README.txt with the captions and manifest.json: the store, the runs with
their checkpoint paths and fingerprints, analysis options, filters, opdviz version and date.

Static formats (pdf, svg, png) are sized for a paper column (``--width single`` 3.5 in, ``double``
7 in, 8–9 pt text) and need Chromium (Debian's ``chromium`` package); ``html`` is interactive
and opens offline (plotly.js inlined). ``--gallery`` writes the README's gallery (a few PNGs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opdviz.errors import OptionsError, StoreError
from opdviz.options import DEFAULT_CRITERIA
from opdviz.cli.compute import DEFAULT_DB

CRITERIA = DEFAULT_CRITERIA
PAGES = ("overview", "sparsity", "spectra", "geometry", "tensor", "compare", "overlap", "trajectory")
# the README's figure gallery (docs/gallery/): a handful of figures, double-column PNGs at modest resolution
GALLERY = ("overview.sparsity_heatmap", "overview.coverage", "sparsity.criteria", "spectra.normalised",
           "geometry.principal_projection", "tensor.sparsity_map", "overlap.ratio", "trajectory.step_metric")


def register(sub) -> None:
    p = sub.add_parser("figures", help="export figures (pdf/png/svg/html) and their data for a paper",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    p.add_argument("--run", action="append", default=None, metavar="NAME",
                   help="include this run (repeat for several; default: every run)")
    p.add_argument("--list", action="store_true",
                   help="print the name of every figure (as opdviz.figure_names() returns them) and exit")
    p.add_argument("--out", default=None, help="output folder (created if missing; required unless --list or --gallery)")
    p.add_argument("--format", choices=("pdf", "png", "svg", "html"), default="pdf", help="figure format (default: pdf)")
    p.add_argument("--page", action="append", choices=PAGES, default=None,
                   help="only this dashboard page's figures (repeatable; default: every page)")
    p.add_argument("--criterion", choices=CRITERIA, default="abs_1e-5",
                   help="what counts as a changed entry (default: abs_1e-5, i.e. |ΔW| > 1e-5)")
    p.add_argument("--width", choices=("single", "double"), default="single",
                   help="paper column width of static figures (default: single, 3.5 in; double: 7 in)")
    p.add_argument("--tensor", default=None, help="tensor for the tensor page (default: the largest matrix)")
    p.add_argument("--figure", action="append", default=None, metavar="KEY",
                   help="only this figure (repeatable), e.g. overview.coverage")
    p.add_argument("--with-steps", action="store_true",
                   help="without --run, also include the per-step runs of trajectories (default: left out)")
    p.add_argument("--gallery", action="store_true",
                   help="write the README's gallery: the figures of GALLERY as double-column PNGs (scale 1.5) "
                        "into --out (default docs/gallery); run it on the demo store")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.list:
        from opdviz.api import figure_names

        print("\n".join(figure_names()))
        return 0
    if not args.out:
        raise OptionsError("--out FOLDER is required (or --list to see the figure names)")
    from opdviz.views.export import export_figures
    from opdviz.store import Selection, Store
    from opdviz.store.queries import runs
    from opdviz.views.context import ViewContext

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
    if not wanted and not args.with_steps:
        # as the dashboard's "all runs": trajectory steps (runs NAME@step) belong on the Trajectory figures
        table = runs(store)
        kinds = table["kind"] if "kind" in table else None
        primary = tuple(r for r, k in zip(table["run_id"], kinds)) if kinds is None else \
            tuple(r for r, k in zip(table["run_id"], kinds) if k != "trajectory")
        wanted = primary if 0 < len(primary) < len(known) else ()
    if args.gallery:
        args.out = args.out or str(Path(__file__).resolve().parents[2] / "docs" / "gallery")
        args.format, args.width, args.figure = "png", "double", list(args.figure or GALLERY)
    if not args.out:
        raise OptionsError("say where the figures go: --out FOLDER (or --gallery for docs/gallery)")
    skipped: list[str] = []
    paths = export_figures(store, Selection(runs=wanted), ViewContext(criterion=args.criterion, tensor=args.tensor),
                           Path(args.out), fmt=args.format, pages=args.page, width=args.width,
                           on_skip=lambda key, why: skipped.append(f"{key} ({why})"), only=args.figure,
                           scale=1.5 if args.gallery else None)
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
