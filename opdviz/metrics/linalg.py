"""Factorizations shared by the spectrum and geometry metrics: one pass over a tensor pair.

Everything here works in a *working orientation* with m ≥ n (wide matrices are transposed by the
caller, which then swaps left/right outputs), so every factorization lives on the small side n:

- exact: float64 Grams G_b = W_bᵀW_b, X = W_bᵀΔ, G_Δ = ΔᵀΔ accumulated over row chunks (Δ formed in
  float32 from the stored values, as everywhere in opdviz), then G_p = G_b + X + Xᵀ + G_Δ exactly.
  The symmetric ones (G_b, G_Δ) are computed on and below the diagonal only (``add_sym_gram``).
  eigh gives σ² and V; left vectors are never formed in m-space (U_bᵀΔ = Σ_b⁻¹V_bᵀX). σ from a
  float64 Gram carries an absolute error ≈ 1e-8·σ₁ at worst (≈ eps64·σ₁²/(2σᵢ) above that).
- approx: ``torch.svd_lowrank`` (seeded inside ``fork_rng``: reruns are bit-identical) of W_b, W_p, Δ.

Base/post directions with σ ≤ ``VALID_REL``·σ₁ are treated as null (rank-deficient matrices): the
Gram cannot resolve left vectors there, so metrics that need them are NaN (see geometry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


VALID_REL = 1e-6          # σ ≤ VALID_REL·σ₁: direction treated as null (Gram noise floor ≈ 1e-8·σ₁)
CPU_CHUNK_ELEMS = 1 << 22  # elements per row chunk on CPU (measured: 4M beats 16M on 2 cores)
GPU_CHUNK_ELEMS = 1 << 26
SYM_BLOCKS = 4            # column blocks of a symmetric Gram (``add_sym_gram``): 5/8 of the full product
SYM_MIN_COLS = 256        # narrower Grams in one block (small blocks lose more to BLAS overhead than they save)
APPROX_OVERSAMPLE = 8
APPROX_NITER = 4


def chunk_rows(n: int, device: torch.device) -> int:
    elems = GPU_CHUNK_ELEMS if device.type == "cuda" else CPU_CHUNK_ELEMS
    return max(16, elems // max(n, 1))


def add_sym_gram(g: torch.Tensor, a: torch.Tensor) -> None:
    """g += aᵀa on and below the diagonal (the upper triangle is not touched; ``lower_to_full`` fills it).

    torch has no syrk: the product is taken in ``SYM_BLOCKS`` column blocks, block i against columns
    0…end of block i, so only the lower trapezoids are computed — (b + 1)/(2b) of a full aᵀa's flops
    (5/8 for 4 blocks; measured 0.64× the time of the full product on 896 columns)."""
    n = a.shape[1]
    nb = SYM_BLOCKS if n >= SYM_MIN_COLS else 1
    edges = [n * i // nb for i in range(nb + 1)]
    for lo, hi in zip(edges, edges[1:]):
        g[lo:hi, :hi].addmm_(a[:, lo:hi].T, a[:, :hi])


def lower_to_full(g: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle (diagonal included) is that of ``g``."""
    return torch.tril(g) + torch.tril(g, -1).T


def base_gram(wb: torch.Tensor) -> torch.Tensor:
    """float64 W_bᵀW_b of an m×n working view, row-chunked (never an m×n float64 copy)."""
    m, n = wb.shape
    dev = wb.device
    rows = min(m, chunk_rows(n, dev))
    gb = torch.zeros(n, n, dtype=torch.float64, device=dev)
    b64 = torch.empty(rows, n, dtype=torch.float64, device=dev)
    for i in range(0, m, rows):
        r = min(rows, m - i)
        b = b64[:r]
        b.copy_(wb[i:i + r])
        add_sym_gram(gb, b)
    return lower_to_full(gb)


def cross_grams(wb: torch.Tensor, wp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (W_bᵀΔ, ΔᵀΔ) of m×n working views, Δ = float32(W_p) − float32(W_b): the post's share of
    the Grams (W_bᵀW_b is the base's, ``base_gram``, computed once per base tensor).

    Row-chunked so temporary memory is a few chunks, never an m×n float64 copy."""
    m, n = wb.shape
    dev = wb.device
    rows = min(m, chunk_rows(n, dev))
    f64 = dict(dtype=torch.float64, device=dev)
    x, gd = (torch.zeros(n, n, **f64) for _ in range(2))
    b64 = torch.empty(rows, n, **f64)
    d64 = torch.empty(rows, n, **f64)
    d32 = torch.empty(rows, n, dtype=torch.float32, device=dev)
    for i in range(0, m, rows):
        r = min(rows, m - i)
        d, b, dd = d32[:r], b64[:r], d64[:r]
        d.copy_(wp[i:i + r])
        d.sub_(wb[i:i + r])             # exact upcast of the stored values, difference in float32
        b.copy_(wb[i:i + r])
        dd.copy_(d)
        x.addmm_(b.T, dd)
        add_sym_gram(gd, dd)
    return x, lower_to_full(gd)


def grams(wb: torch.Tensor, wp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (W_bᵀW_b, W_bᵀΔ, ΔᵀΔ) of m×n working views (``base_gram`` + ``cross_grams``)."""
    return (base_gram(wb), *cross_grams(wb, wp))


def eigh_desc(g: torch.Tensor, vectors: bool = True):
    """Eigen-decomposition of a symmetric PSD Gram, descending; returns (σ = sqrt(max(λ, 0)), V or None)."""
    if vectors:
        lam, v = torch.linalg.eigh(g)
        v = v.flip(1)
    else:
        lam, v = torch.linalg.eigvalsh(g), None
    sig = lam.flip(0).clamp_min(0).sqrt()
    return sig, v


def valid_count(sig: torch.Tensor) -> int:
    """Leading directions with σ > VALID_REL·σ₁ (0 for a zero matrix)."""
    if sig.numel() == 0 or float(sig[0]) <= 0:
        return 0
    return int((sig > VALID_REL * sig[0]).sum())


def lowrank(a: torch.Tensor, q: int, seed: int):
    """Seeded randomized top-q SVD (U m×q, S q, V n×q) of a float32 matrix; identical on rerun."""
    m, n = a.shape
    qs = min(q + APPROX_OVERSAMPLE, m, n)
    devices = [a.device] if a.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(a, q=qs, niter=APPROX_NITER)
    return u[:, :q], s[:q], v[:, :q]


def sin2_from_bases(qb: torch.Tensor, qp: torch.Tensor) -> torch.Tensor:
    """Squared sines of the principal angles between span(qb) and span(qp) (orthonormal columns,
    same k), ascending. From E = qp − qb(qbᵀqp), whose Gram has no 1 − cos² cancellation."""
    e = qp - qb @ (qb.T @ qp)
    return torch.linalg.eigvalsh(e.T @ e).clamp(0, 1)


def sin2_from_complement(rest_coords: torch.Tensor, extra_gram: torch.Tensor | None = None) -> torch.Tensor:
    """Squared sines, ascending, when the component of Q_p outside span(Q_b,k) is known as
    coordinates ``rest_coords`` in an orthonormal complement basis (+ an optional k×k Gram of the
    part outside that basis). Accurate relative to the largest sine (eigvalsh of a k×k Gram)."""
    g = rest_coords.T @ rest_coords
    if extra_gram is not None:
        g = g + extra_gram
    return torch.linalg.eigvalsh((g + g.T) / 2).clamp(0, 1)


def cum_joint(z2: torch.Tensor) -> torch.Tensor:
    """v[i] = sum of z2[:i+1, :i+1] (a square matrix of squares)."""
    c = z2.cumsum(0).cumsum(1)
    return torch.diagonal(c)


@dataclass
class BaseFactors:
    """The base-only factorization of one matrix (working orientation, m ≥ n), computed once per base
    tensor and shared by every post of a job. exact: G_b = W_bᵀW_b and its eigen-decomposition (σ, V
    descending, float64); approx: the seeded randomized top-q SVD (U, σ, V float32) of W_b."""

    exact: bool
    sig: torch.Tensor
    v: torch.Tensor
    gram: torch.Tensor | None = None     # exact only
    u: torch.Tensor | None = None        # approx only


def base_factors(wb: torch.Tensor, exact: bool, q: int, seed: int) -> BaseFactors:
    """Factorize the m×n working view of W_base: exact (float64 Gram + eigh) or approx (top-q)."""
    if exact:
        gb = base_gram(wb)
        sig, v = eigh_desc(gb)
        # row-major like a reloaded cache entry: BLAS rounds differently for other layouts (last bits)
        return BaseFactors(True, sig, v.contiguous(), gram=gb)
    u, s, v = lowrank(wb.float(), q, seed)
    return BaseFactors(False, s.contiguous(), v.contiguous(), u=u.contiguous())


@dataclass
class Factors:
    """Results of the one pass over a pair, working orientation (m ≥ n); numpy float64 where final."""

    m: int
    n: int
    exact: bool
    delta_fro2: float
    delta_sigma: np.ndarray          # descending; length n (exact) or q (approx)
    base_sigma: np.ndarray
    post_sigma: np.ndarray
    base_v: torch.Tensor             # n×(n or q) float64, descending order
    proj_left_cum: np.ndarray        # Σ_{i≤j} ‖u_iᵀΔ‖² (NaN past the valid base rank)
    proj_right_cum: np.ndarray       # Σ_{i≤j} ‖Δv_i‖²
    proj_joint_cum: np.ndarray       # ‖U_{j+1}ᵀΔV_{j+1}‖F²
    sin2_left: dict[int, np.ndarray | None]    # k (capped) → ascending sin² (None: undefined)
    sin2_right: dict[int, np.ndarray | None]


def exact_factors(wb: torch.Tensor, wp: torch.Tensor, ks: list[int], base: BaseFactors | None = None) -> Factors:
    """Gram path. ``ks``: capped angle sizes; ``base``: ``base_factors(wb, True, …)`` if already computed."""
    m, n = wb.shape
    base = base if base is not None else base_factors(wb, True, 0, 0)
    gb, bsig, vb = base.gram, base.sig, base.v
    x, gd = cross_grams(wb, wp)
    dsig, _ = eigh_desc(gd, vectors=False)
    gp = gb + x + x.T + gd
    psig, vp = eigh_desc(gp)
    del gp
    fro2 = float(torch.diagonal(gd).sum())
    rb, rp = valid_count(bsig), valid_count(psig)

    # U_bᵀΔ over the valid base directions: Y = Σ⁻¹VᵀX (rows past rb are undefined → NaN)
    y = (vb[:, :rb].T @ x) / bsig[:rb, None]
    left_rows = (y * y).sum(1)
    left = torch.full((n,), float("nan"), dtype=torch.float64, device=wb.device)
    left[:rb] = left_rows.cumsum(0)
    right = ((gd @ vb) * vb).sum(0).cumsum(0)
    right[rb:] = float("nan")          # past the rank the null-space basis is arbitrary
    joint = torch.full((n,), float("nan"), dtype=torch.float64, device=wb.device)
    if rb:
        z = y @ vb[:, :rb]
        joint[:rb] = cum_joint(z * z)

    # Left angles: coordinates of U_p,k = W_pV_p,kΣ_p,k⁻¹ in the base left basis are
    # C = (Σ_bV_bᵀ + Y)V_p,kΣ_p,k⁻¹; the part outside span(U_b,valid) has Gram Σ_p⁻¹V_pᵀTV_pΣ_p⁻¹ with
    # T = (I−P)-Gram of W_p = ΔᵀΔ − YᵀY (+ the null-direction tail of W_b), no cancellation vs W.
    b_coords = bsig[:rb, None] * vb[:, :rb].T + y
    yty = torch.zeros_like(gd)
    add_sym_gram(yty, y)
    t = gd - lower_to_full(yty)
    del yty
    if m == n and rb == n:
        t = torch.zeros_like(t)        # U_b spans everything: nothing lies outside (exact, not noise)
    elif rb < n:
        vn = vb[:, rb:]
        tail = vn.T @ x
        t = t + (vn * bsig[rb:].square()) @ vn.T + vn @ tail + tail.T @ vn.T
    sl, sr = {}, {}
    top = max((k for k in ks if k <= rb and k <= rp), default=0)
    t_scaled = t @ (vp[:, :top] / psig[:top])        # T V_p Σ_p⁻¹ once for the largest k: columns are per k
    for k in ks:
        if k > rb or k > rp:
            sl[k] = sr[k] = None
            continue
        vpk = vp[:, :k]
        c = (b_coords[k:] @ vpk) / psig[:k]            # only the rows outside span(U_b,k) are needed
        scaled = vpk / psig[:k]
        sl[k] = sin2_from_complement(c, scaled.T @ t_scaled[:, :k]).cpu().numpy()
        sr[k] = sin2_from_complement(vb[:, k:].T @ vpk).cpu().numpy()

    return Factors(m, n, True, fro2, _np(dsig), _np(bsig), _np(psig), vb,
                   _np(left), _np(right), _np(joint), sl, sr)


def approx_factors(wb: torch.Tensor, wp: torch.Tensor, ks: list[int], q: int, seed: int,
                   base: BaseFactors | None = None) -> Factors:
    """Randomized top-q path (flagged approx). Angles for k > q are undefined (None)."""
    m, n = wb.shape
    base = base if base is not None else base_factors(wb, False, q, seed)
    ub, bs, vb = base.u, base.sig, base.v
    d = wp.to(torch.float32, copy=True)     # never .float(): that aliases a float32 input
    d.sub_(wb)
    fro2 = float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
    _, ds, _ = lowrank(d, q, seed)
    y = (ub.T @ d).double()                  # q×n = U_bᵀΔ
    dv = (d @ vb).double()                   # m×q = ΔV_b
    del d
    up, ps, vp = lowrank(wp.float(), q, seed)
    ub, vb, up, vp = ub.double(), vb.double(), up.double(), vp.double()
    rb, rp = valid_count(bs), valid_count(ps)
    left = (y * y).sum(1).cumsum(0)
    left[rb:] = float("nan")
    right = (dv * dv).sum(0).cumsum(0)
    right[rb:] = float("nan")
    z = y @ vb
    joint = cum_joint(z * z)
    joint[rb:] = float("nan")
    sl, sr = {}, {}
    for k in ks:
        if k > q or k > rb or k > rp:
            sl[k] = sr[k] = None
            continue
        sl[k] = sin2_from_bases(ub[:, :k], up[:, :k]).cpu().numpy()
        sr[k] = sin2_from_bases(vb[:, :k], vp[:, :k]).cpu().numpy()
    return Factors(m, n, False, fro2, _np(ds), _np(bs), _np(ps), vb,
                   _np(left), _np(right), _np(joint), sl, sr)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def floor_frac(frac: float, size: int) -> int:
    """floor(frac·size), robust to binary fractions like 0.29·100 = 28.999…"""
    return int(math.floor(frac * size + 1e-9))


def ceil_frac(frac: float, size: int) -> int:
    return int(math.ceil(frac * size - 1e-9))
