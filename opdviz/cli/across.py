"""``opdviz overlap``, ``opdviz trajectory`` and ``opdviz masks``: across runs, along a run, and its mask.

    opdviz overlap --db DB --base BASE --a POST_A --b POST_B --run-a A --run-b B
    opdviz trajectory --db DB BASE run/ --name NAME --method RL          # run/checkpoint-100/, …
    opdviz trajectory --db DB BASE ck1 ck2 ck3 --steps 100 200 300 --name NAME --method RL
    opdviz masks --base BASE --post POST --criterion abs_1e-5 --out masks.safetensors [--packed]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opdviz.io.hub import add_download_flag, prefetch
from opdviz.cli.compute import DEFAULT_DB, add_option_flags, options_from_args


def register(sub) -> None:
    p = sub.add_parser("overlap", help="mask overlap (Jaccard, coverage vs independence) of two runs sharing a base",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    p.add_argument("--base", required=True, help="the shared base checkpoint")
    p.add_argument("--a", required=True, help="post-trained checkpoint of run A")
    p.add_argument("--b", required=True, help="post-trained checkpoint of run B")
    p.add_argument("--run-a", required=True, help="run name of A (in the store, or registered with --method-a)")
    p.add_argument("--run-b", required=True, help="run name of B (in the store, or registered with --method-b)")
    p.add_argument("--method-a", default=None, help="method label of A, when run A is not in the store")
    p.add_argument("--method-b", default=None, help="method label of B, when run B is not in the store")
    p.add_argument("--base-b", default=None, help="B's base when stored elsewhere: checked to be identical, byte for byte")
    p.add_argument("--overwrite", action="store_true", help="recompute every tensor of this pair")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_download_flag(p)
    add_option_flags(p)
    p.set_defaults(func=overlap_main)

    t = sub.add_parser("trajectory", help="analyse the checkpoints of one run against the base, step by step",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("base", help="base checkpoint")
    t.add_argument("checkpoints", nargs="+", metavar="FOLDER_OR_CKPTS",
                   help="a folder of step-tagged checkpoints (checkpoint-100/ …) or the checkpoints themselves")
    t.add_argument("--steps", nargs="+", type=int, default=None, help="one step per checkpoint (default: from names)")
    t.add_argument("--name", required=True, help="trajectory name; the per-step runs are NAME@STEP")
    t.add_argument("--method", required=True, help="method label (OPD, RL, SFT, …)")
    t.add_argument("--k", type=int, default=16, help="K of the subspace similarity Sim_K (default: 16)")
    t.add_argument("--hill-frac", type=float, default=0.10,
                   help="fraction of the nonzero eigenvalues in the Hill tail estimate (default: 0.10)")
    t.add_argument("--db", default=DEFAULT_DB, help=f"DuckDB store (default: {DEFAULT_DB})")
    t.add_argument("--overwrite", action="store_true", help="replace stored results of this trajectory")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_download_flag(t)
    t.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: $OPDVIZ_THREADS, else the cores this process may run on)")
    add_option_flags(t)
    t.set_defaults(func=trajectory_main)

    m = sub.add_parser("masks", help="export the changed mask of every tensor (safetensors) for subnetwork training",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--base", required=True, help="base checkpoint")
    m.add_argument("--post", required=True, help="post-trained checkpoint")
    m.add_argument("--criterion", default="abs_1e-5", help="exact, abs_EPS, relrms_TAU or bf16_ETA (default: abs_1e-5)")
    m.add_argument("--out", required=True, help="output .safetensors file")
    m.add_argument("--packed", action="store_true", help="bit-packed uint8 masks (8× smaller), shapes in the metadata")
    m.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt checkpoints (weights_only loading)")
    add_download_flag(m)
    m.set_defaults(func=masks_main)


def overlap_main(args: argparse.Namespace) -> int:
    from opdviz.engine.overlap import OverlapSpec, run_overlap
    from opdviz.views.across import overlap_groups
    from opdviz.store import Store

    opts = options_from_args(args)
    prefetch([args.base, args.a, args.b, args.base_b], args.download)
    spec = OverlapSpec(base=Path(args.base), a=Path(args.a), b=Path(args.b), run_a=args.run_a, run_b=args.run_b,
                       db=Path(args.db), options=opts, base_b=Path(args.base_b) if args.base_b else None,
                       method_a=args.method_a, method_b=args.method_b)
    res = run_overlap(spec, progress=not args.no_progress, overwrite=args.overwrite)
    s = overlap_groups(Store(args.db), args.run_a, args.run_b, opts.criterion, "all").iloc[0]
    print(f"{args.run_a} ∩ {args.run_b}: {res['n_tensors']} tensors ({res['skipped']} skipped) in {res['wall_s']:.1f} s "
          f"→ {args.db}\n  {opts.criterion}: density A {s.p_a:.4g}, B {s.p_b:.4g}; Jaccard {s.jaccard:.4g} "
          f"(independence {s.jaccard_baseline:.4g}, ×{s.jaccard_ratio:.3g}); |A∩B|/|A| {s.cov_a:.4g} "
          f"(baseline {s.cov_a_baseline:.4g}); |A∩B|/|B| {s.cov_b:.4g} (baseline {s.cov_b_baseline:.4g})")
    return 0


def trajectory_main(args: argparse.Namespace) -> int:
    from opdviz.engine.threads import apply_threads
    from opdviz.engine.trajectory import TrajectorySpec, find_checkpoints, run_trajectory

    prefetch([args.base, *args.checkpoints], args.download)
    apply_threads(args.threads)
    cks = find_checkpoints([Path(p) for p in args.checkpoints], args.steps)
    spec = TrajectorySpec(base=Path(args.base), checkpoints=cks, name=args.name, method=args.method, db=Path(args.db),
                          options=options_from_args(args), k=args.k, hill_frac=args.hill_frac)
    res = run_trajectory(spec, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"trajectory {args.name}: steps {res['steps']}, {res['n_tensors']} tensors ({res['n_failed']} failed), "
          f"trajectory metrics in {res['wall_s']:.1f} s → {args.db}")
    return 0


def masks_main(args: argparse.Namespace) -> int:
    from opdviz.engine.masks import write_masks

    prefetch([args.base, args.post], args.download)
    res = write_masks(args.base, args.post, args.out, args.criterion, packed=args.packed,
                      allow_pickle=args.allow_pickle)
    frac = res["changed"] / res["numel"] if res["numel"] else 0.0
    print(f"{res['tensors']} masks ({res['skipped']} tensors skipped), {res['changed']} of {res['numel']} entries "
          f"changed ({100 * frac:.3g} %) under {args.criterion} → {args.out}")
    return 0
