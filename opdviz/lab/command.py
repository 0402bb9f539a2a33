"""``opdviz lab``: regenerate the demo lab (teacher, student base, OPD/SFT/RL checkpoints).

    opdviz lab --out data/demo            # default settings, a few minutes on 2 CPU cores
    opdviz lab --out /tmp/lab --steps 10  # quick run: 10 post-training steps, teacher/base scaled alike
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


def main(args: argparse.Namespace) -> int:
    import os

    # OpenMP threads that spin while waiting starve each other on a shared 2-core machine (5-20×
    # slower); passive waiting only takes effect if set before torch loads, hence here, at the edge
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .pipeline import run_lab

    summary = run_lab(Path(args.out), seed=args.seed, steps=args.steps,
                      progress=lambda line: print(line, file=sys.stderr, flush=True))
    for name, acc in summary["accuracy"].items():
        print(f"{name:>16}: {acc:.3f}")
    print(f"wrote {args.out} in {summary['wall_s']:.1f} s")
    return 0
