"""``opdviz lab``: regenerate the demo lab (teacher, student base, OPD/SFT/RL checkpoints).

    opdviz lab --out data/demo            # default settings, a few minutes on 2 CPU cores
    opdviz lab --out /tmp/lab --steps 10  # quick run: 10 post-training steps, teacher/base scaled alike
    opdviz lab sweep                      # OPD/RL/SFT over rates, precisions, decay, seeds → the store
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = "data/demo"


def register(sub) -> None:
    p = sub.add_parser("lab", help="regenerate the demo lab: a tiny Llama post-trained by OPD, SFT and RL",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (default: 0)")
    p.add_argument("--steps", type=int, default=None,
                   help="post-training steps per run; teacher and base steps scale alike (default: 120)")
    p.set_defaults(func=main)
    lab_sub = p.add_subparsers(dest="lab_command", metavar="SUBCOMMAND")
    register_sweep(lab_sub)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


SWEEP_DOC = """\
Train OPD, RL and SFT from the lab's base over a grid of learning rates, precisions (fp32 master
weights saved as bf16, or bf16 throughout), weight decays and seeds; analyse every checkpoint into
the store with its settings and held-out accuracy (runs.extra). With --subnetwork (default), each
OPD run is retrained on only the coordinates it changed and on a random mask of the same size per
tensor. Runs complete in the store are skipped, so rerunning the same command resumes.

    opdviz lab sweep                                   # the default grid: 180 runs, ≈ 25 min of CPU
    opdviz lab sweep --lrs 1e-5,1e-4 --seeds 0 --methods opd --precisions bf16 --weight-decay 0
"""


def register_sweep(sub) -> None:
    from opdviz.lab.grid import SweepGrid

    d = SweepGrid()
    p = sub.add_parser("sweep", help="OPD/RL/SFT over learning rates, precisions, weight decay and seeds",
                       description=SWEEP_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lab", default=DEFAULT_OUT, help=f"lab folder with base/ and teacher/ (default: {DEFAULT_OUT})")
    p.add_argument("--out", default="data/lab-sweep", help="where the sweep's checkpoints go (default: data/lab-sweep)")
    p.add_argument("--db", default="data/opdviz.duckdb", help="store to fill (default: data/opdviz.duckdb)")
    p.add_argument("--methods", type=_names, default=d.methods, help=f"comma-separated (default: {','.join(d.methods)})")
    p.add_argument("--lrs", type=_floats, default=d.lrs,
                   help=f"comma-separated learning rates (default: {','.join(f'{x:g}' for x in d.lrs)})")
    p.add_argument("--precisions", type=_names, default=d.precisions,
                   help=f"fp32 (master weights, saved as bf16) and/or bf16 (throughout) (default: {','.join(d.precisions)})")
    p.add_argument("--weight-decay", type=_floats, default=d.weight_decays,
                   help=f"comma-separated AdamW weight decays (default: {','.join(f'{x:g}' for x in d.weight_decays)})")
    p.add_argument("--seeds", type=_ints, default=d.seeds, help=f"comma-separated (default: {','.join(map(str, d.seeds))})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"post-training steps per run (default: {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"sequences per step (default: {d.batch})")
    p.add_argument("--subnetwork", action=argparse.BooleanOptionalAction, default=d.subnetwork,
                   help="retrain each OPD run on its changed mask and on a random mask of the same size (default: on)")
    p.set_defaults(func=sweep_main)


def sweep_main(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from opdviz.lab.grid import SweepGrid
    from opdviz.lab.sweep import run_sweep

    grid = SweepGrid(methods=args.methods, lrs=args.lrs, precisions=args.precisions,
                     weight_decays=args.weight_decay, seeds=args.seeds, steps=args.steps, batch=args.batch,
                     subnetwork=args.subnetwork)
    report = run_sweep(grid, Path(args.lab), Path(args.out), Path(args.db),
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    done = [r for r in report if r["status"] == "done"]
    for r in report:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"{r['status']:>8}  {acc:>6}  {r['run_id']}")
    print(f"{len(done)} runs trained and analysed, {len(report) - len(done)} already stored → {args.db}")
    return 0


def main(args: argparse.Namespace) -> int:
    import os

    # OpenMP threads that spin while waiting starve each other on a shared 2-core machine (5-20×
    # slower); passive waiting only takes effect if set before torch loads, hence here, at the edge
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from opdviz.lab.pipeline import run_lab

    summary = run_lab(Path(args.out), seed=args.seed, steps=args.steps,
                      progress=lambda line: print(line, file=sys.stderr, flush=True))
    for name, acc in summary["accuracy"].items():
        print(f"{name:>16}: {acc:.3f}")
    print(f"wrote {args.out} in {summary['wall_s']:.1f} s")
    return 0
