"""How far approximate (randomized top-q) spectra and geometry are from exact, on stated inputs.

    .venv/bin/python bench/bench_approx.py [--rows 2048] [--cols 1024] [--q 256 64] [--seed 0]

The pair: W_base = U diag(σ) Vᵀ + noise with a power-law spectrum σᵢ = i^-0.5 (a trained weight's slow
decay), W_post = W_base + a sparse update (35 % of coordinates, ~1e-3·RMS) + a rank-8 component, in
float32. For each q the randomized path (``--spectrum approx --approx-rank q``) is compared with the
exact one on every scalar that both produce: the largest absolute error per metric family is printed
as a Markdown table (fractions as percentage points, angles in degrees). The README quotes the result.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opdviz.metrics.pair import analyse_pair  # noqa: E402
from opdviz.metrics.registry import family_of  # noqa: E402
from opdviz.options import AnalysisOptions  # noqa: E402


def pair(m: int, n: int, seed: int, decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -decay
    wb = (u * s) @ v.T + 1e-3 * torch.randn(m, n, generator=g)
    rms = float(wb.pow(2).mean().sqrt())
    mask = torch.rand(m, n, generator=g) < 0.35
    d = mask * torch.randn(m, n, generator=g) * 1e-3 * rms
    d += 2e-3 * rms * torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) / math.sqrt(8)
    return wb, wb + d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--q", type=int, nargs="+", default=[256, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decay", type=float, nargs="+", default=[0.5, 0.0],
                    help="σᵢ(W_base) = i^-decay (0 = a flat, random-matrix spectrum)")
    a = ap.parse_args()
    for decay in a.decay:
        report(a, decay)


def report(a, decay: float) -> None:
    wb, wp = pair(a.rows, a.cols, a.seed, decay)
    exact = analyse_pair(wb, wp, AnalysisOptions(spectrum="exact"), matrix=True).scalars
    print(f"\ninput: {a.rows}×{a.cols} float32, σᵢ(W_base) = i^-{decay}, seed {a.seed}; max |approx − exact| "
          "per family (fractions in percentage points, angles in degrees; values the approx path leaves NaN "
          "are counted in brackets)\n")
    print("| family | unit | " + " | ".join(f"q = {q}" for q in a.q) + " |")
    print("|---|---|" + "---|" * len(a.q))
    table: dict[str, dict[int, tuple[float, int]]] = {}
    units: dict[str, str] = {}
    for q in a.q:
        approx = analyse_pair(wb, wp, AnalysisOptions(spectrum="approx", approx_rank=q), matrix=True).scalars
        for name, ev in exact.items():
            if re.match(r"(sparsity_|lowmag_|coord_|delta_|base_|post_|rel_change|spectrum_exact)", name):
                continue          # elementwise: identical by construction
            info = family_of(name)
            units[info.family] = info.unit
            av = approx.get(name, float("nan"))
            scale = 100.0 if info.unit == "fraction" else (180 / math.pi if info.unit == "radians" else 1.0)
            err, nans = table.setdefault(info.family, {}).get(q, (0.0, 0))
            if math.isnan(av) and not math.isnan(ev):
                nans += 1
            elif not math.isnan(ev):
                err = max(err, abs(av - ev) * scale)
            table[info.family][q] = (err, nans)
    for fam, per_q in table.items():
        cells = []
        for q in a.q:
            err, nans = per_q.get(q, (0.0, 0))
            cells.append(f"{err:.3g}" + (f" ({nans} NaN)" if nans else ""))
        print(f"| `{fam}` | {units[fam]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    torch.manual_seed(0)
    np.random.seed(0)
    main()
