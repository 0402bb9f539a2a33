"""Top-q energy shares and the threshold sweep of |ΔW|, exact without a sort.

A mixin of the elementwise pass (``opdviz.metrics.elementwise``). The main pass keeps the top 16 bits
of |ΔW| (float32) as int16, 2 B/elem, and their histogram; afterwards the few elements in the buckets
that hold a top-q boundary or a sweep threshold are gathered again and refined on their low 16 bits.
fp64 inputs and small tensors take both from a full |ΔW| copy instead.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from opdviz.metrics.chunkops import arr, bincount, floor32
from opdviz.metrics.linalg import ceil_frac

SWEEP_EPS = tuple(10.0 ** (-10 + 0.5 * i) for i in range(19))  # 10^(−10 + i/2): 1e-10 … 1e-1
TOP_FRACS = (0.001, 0.01, 0.05)
_SUBBLOCK = 1 << 20      # elements per block for numpy temporaries that widen to int64
# below this many elements a full |ΔW| copy is cheaper than the bucket refinement, whose fixed cost
# (65536-wide histograms per boundary bucket) dominates small tensors (~0.2 s each on a loaded CPU)
_SMALL_EXACT = 1 << 16
_LITTLE = sys.byteorder == "little"


class DeltaTop:
    """The |ΔW| buckets of the main pass and the top-q shares and sweep counts computed from them."""

    def _top_and_sweep(self) -> tuple[list[float], list[int]]:
        """Σ of the squared top-q |ΔW| for each of ``TOP_FRACS``, and the count above each ``SWEEP_EPS``."""
        if self.hi is not None and self.n > _SMALL_EXACT:
            return self._refine_delta()
        return self._delta_full()

    def _store_hi(self, fd_t: torch.Tensor, off: int, L: int):
        hi_t = self.hi[off:off + L]
        if self.cpu and _LITTLE:
            np.copyto(hi_t.numpy().view(np.uint16), fd_t.numpy().view(np.uint16)[1::2])
        else:
            torch.bitwise_right_shift(fd_t.view(torch.int32), 16, out=self.tmp32[:L])
            hi_t.copy_(self.tmp32[:L])
        self.Hhi += bincount(arr(hi_t), 32768)

    def _refine_delta(self) -> tuple[list[float], list[int]]:
        """Exact top-q energies and sweep counts from the int16 |ΔW| buckets plus a refinement of
        the boundary buckets on the low 16 bits (only those elements are gathered again)."""
        n, H = self.n, self.Hhi
        above_or_eq = np.cumsum(H[::-1])[::-1]          # count(hi ≥ h)
        plan_q = []
        for q in TOP_FRACS:
            k = max(1, ceil_frac(q, n))
            B = int(np.nonzero(above_or_eq >= k)[0][-1])
            plan_q.append((B, k - int(above_or_eq[B] - H[B])))
        sweep_bits = [int(floor32(e).view(np.uint32)) for e in SWEEP_EPS]
        # Bucket 0 holds |ΔW| < 2^-126·(1 + 2^-7) (zeros, subnormals): its energy is below float64's
        # resolution of any nonzero total, so a top-q boundary there takes every bucket above it.
        special = sorted(({b >> 16 for b in sweep_bits} | {B for B, _ in plan_q}) - {0})
        sidx = np.full(32768, -1, dtype=np.int64)
        sidx[special] = np.arange(len(special))
        B_min = min(B for B, _ in plan_q)
        lut = np.zeros(32768, dtype=bool)
        lut[special] = True
        lut[B_min + 1:] = True
        lut_t = torch.from_numpy(lut).to(self.dev)
        L2 = np.zeros(len(special) * 65536, dtype=np.int64)
        E = np.zeros(32768, dtype=np.float64)
        for off, L, i, j in self._chunks():
            seg = self.hi[off:off + L]
            if self.cpu:
                segn = seg.numpy()
                pos = np.concatenate([np.flatnonzero(lut[segn[s:s + _SUBBLOCK]]) + s
                                      for s in range(0, L, _SUBBLOCK)])
                pos_t = torch.from_numpy(pos)
            else:
                pos_t = torch.nonzero(lut_t[seg.long()]).flatten()
            if pos_t.numel() == 0:
                continue
            tb = self._raw(self.w2b, self.raw_b, i, j)
            tp = self._raw(self.w2p, self.raw_p, i, j)
            d = (tp.index_select(0, pos_t).to(self.fdt) - tb.index_select(0, pos_t).to(self.fdt)).abs_()
            d = d.cpu().numpy()
            bits = d.view(np.uint32)
            hc, lo = (bits >> 16).astype(np.intp), (bits & 0xFFFF).astype(np.intp)
            E += np.bincount(hc, weights=d.astype(np.float64) ** 2, minlength=32768)
            si = sidx[hc]
            keep = si >= 0
            L2 += np.bincount(si[keep] * 65536 + lo[keep], minlength=len(L2))
        L2 = L2.reshape(len(special), 65536)
        above = above_or_eq - H                          # count(hi > h)
        lo_vals = np.arange(65536, dtype=np.uint32)
        tops = []
        for B, r in plan_q:
            e = float(E[B + 1:].sum())
            if B:
                cnt = L2[sidx[B]][::-1]                  # bucket B's exact values, descending
                vals = ((np.uint32(B) << np.uint32(16)) | lo_vals[::-1]).view(np.float32).astype(np.float64)
                cum = np.cumsum(cnt)
                i = int(np.searchsorted(cum, r, side="left"))   # bins [0, i) fully in the top r
                taken = r - (int(cum[i - 1]) if i else 0)
                e += float(np.dot(cnt[:i], vals[:i] ** 2)) + taken * vals[i] ** 2
            tops.append(e)
        sweep = []
        for b in sweep_bits:
            h, l = b >> 16, b & 0xFFFF
            sweep.append(int(above[h]) + int(L2[sidx[h], l + 1:].sum()))
        return tops, sweep

    def _delta_full(self) -> tuple[list[float], list[int]]:
        """Top-q and sweep from a full |ΔW| copy: fp64 inputs, and tensors of at most ``_SMALL_EXACT``
        elements. ΔW is formed in the working dtype (float32 for 16/32-bit inputs, as the bucket path
        does), then squared in float64."""
        d = (self.w2p.to(self.fdt) - self.w2b.to(self.fdt)).abs().reshape(-1).to(torch.float64)
        tops = []
        for q in TOP_FRACS:
            k = max(1, ceil_frac(q, self.n))
            tops.append(float((torch.topk(d, k).values ** 2).sum()))
        sweep = [int((d > e).sum()) for e in SWEEP_EPS]
        return tops, sweep
