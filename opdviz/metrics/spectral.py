"""Spectrum of ΔW: stable, effective and numerical ranks, top-k energy shares.

A pure function of the singular values σ of ΔW (descending) and ‖ΔW‖F², which
``opdviz.metrics.linalg`` computes once per pair (exact: float64 Gram; approx: randomized top-q).
A zero ΔW gives 0 ranks and NaN ratios. In approx mode (top-q values only): ‖ΔW‖F is still exact,
so top-k energies with k ≤ q are exact too; effective rank is NaN (needs every σ); a numerical rank
whose count reaches q is NaN (more values may lie above the threshold); energies for k > q are NaN.
"""

from __future__ import annotations

import numpy as np

from opdviz.options import fmt_num, fmt_pct
from opdviz.metrics.linalg import ceil_frac

RANK_TOLS = (1e-6, 1e-5, 1e-4)
ENERGY_KS = (1, 2, 4, 8, 16, 32, 64)
ENERGY_FRACS = (0.01, 0.05, 0.10)



def spectrum_metrics(sigma: np.ndarray, fro2: float, m: int, n: int, exact: bool) -> dict[str, float]:
    """Scalars of the ΔW spectrum. ``sigma``: descending singular values (all, or the top q when
    ``exact`` is False); ``fro2``: ‖ΔW‖F²; ``m``, ``n``: the matrix shape."""
    mn, q = min(m, n), len(sigma)
    complete = exact or q >= mn
    s1 = float(sigma[0]) if q else 0.0
    nan = float("nan")
    out: dict[str, float] = {"sigma_max": s1, "spectrum_exact": 1.0 if exact else 0.0}
    out["stable_rank"] = fro2 / s1 ** 2 if s1 > 0 else nan
    total = float(sigma.sum())
    if complete and total > 0:
        p = sigma[sigma > 0] / total
        out["effective_rank"] = float(np.exp(-(p * np.log(p)).sum()))
    else:
        out["effective_rank"] = nan

    def rank(tol: float) -> float:
        if s1 <= 0:
            return 0.0
        c = int((sigma > tol).sum())
        return nan if (c >= q and not complete) else float(c)

    for t in RANK_TOLS:
        r = rank(t * s1)
        out[f"numerical_rank_{fmt_num(t)}"] = r
        out[f"numerical_rank_{fmt_num(t)}_pct"] = 100.0 * r / mn
    r = rank(s1 * max(m, n) * float(np.finfo(np.float32).eps))
    out["numerical_rank_default"] = r
    out["numerical_rank_default_pct"] = 100.0 * r / mn

    cum = np.cumsum(sigma.astype(np.float64) ** 2)

    def energy(k: int) -> float:
        k = min(k, mn)
        if fro2 <= 0 or k > q or k < 1:
            return nan
        return float(cum[k - 1] / fro2)

    for k in ENERGY_KS:
        out[f"top{k}_energy"] = energy(k)
    for f in ENERGY_FRACS:
        out[f"top_rank_{fmt_pct(f)}_energy"] = energy(ceil_frac(f, mn))
    return out
