"""Low-magnitude coverage and decile density: where, by |W_base| rank, the changed coordinates lie.

A mixin of the elementwise pass (``opdviz.metrics.elementwise``). For bf16/fp16 the ranks of |W_base|
come from the prepass's exact histogram of 15-bit |W_base| patterns: each needed rank k (the α·numel
smallest, the decile edges) gets a threshold pattern, and the main pass counts changed coordinates per
pattern (a joint histogram of patterns × masks); ties at a threshold are resolved in the chunk where
the k-th element falls, by flat index order. fp32/fp64 rank |W_base| with a stable sort instead.
"""

from __future__ import annotations

import numpy as np
import torch

from opdviz.metrics.chunkops import arr, bincount, count, first_true
from opdviz.metrics.linalg import floor_frac

# First 15-bit |x| pattern that is Inf/NaN: bf16 exponent all ones, fp16 exponent all ones.
NONFINITE_KEY = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


class RankCoverage:
    """Rank thresholds of |W_base| and the changed counts below them (uses the pass's buffers and masks)."""

    def _key(self, raw: torch.Tensor, L: int) -> torch.Tensor:
        """15-bit |x| pattern of 16-bit floats into self.key (monotone in |x|)."""
        key = self.key[:L]
        if self.cpu:
            np.bitwise_and(raw.view(torch.int16).numpy().view(np.uint16), 0x7FFF, out=key.numpy().view(np.uint16))
        else:
            torch.bitwise_and(raw.view(torch.int16), 0x7FFF, out=key)
        return key

    def _key_values(self) -> np.ndarray:
        """|x| of every finite 15-bit pattern, float64."""
        k = np.arange(NONFINITE_KEY[self.dtype], dtype=np.uint32)
        if self.dtype == torch.bfloat16:
            return (k << 16).view(np.float32).astype(np.float64)
        return k.astype(np.uint16).view(np.float16).astype(np.float64)

    def _ranks_needed(self) -> list[int]:
        n = self.n
        ks = {floor_frac(a, n) for a in self.opts.coverage_alphas} | {(d * n) // 10 for d in range(11)}
        return sorted(ks)

    def _plan_ranks(self):
        """For each rank k: its threshold pattern v (count(key<v) < k ≤ count(key≤v)) and the
        number j of elements with key == v that belong to the k smallest (the first j in order)."""
        H = self.H
        C = np.cumsum(H)
        self.rank_plan = {}
        for k in self._ranks_needed():
            if k in (0, self.n):
                continue
            v = int(np.searchsorted(C, k, side="left"))
            j = k - int(C[v] - H[v])
            # state: v, j, ties seen, ties-in-U default, ties-in-U exact, done
            self.rank_plan[k] = [v, j, 0, 0, 0, False]
        self.Hd = np.zeros(32768, dtype=np.int64)
        self.He = np.zeros(32768, dtype=np.int64)

    def _joint_hist(self, tb: torch.Tensor, L: int, md_t: torch.Tensor, me_t: torch.Tensor):
        """Histogram of |W_base| patterns per mask group (code = key | U_default<<15 | U_exact<<16),
        then resolve the rank thresholds whose k-th element lies in this chunk."""
        key_t = self._key(tb, L)
        code_t = self.code[:L]
        if self.cpu:
            c8, c32 = self.code8[:L].numpy(), code_t.numpy().view(np.uint32)
            np.left_shift(me_t.numpy().view(np.uint8), 1, out=c8)
            np.bitwise_or(c8, md_t.numpy().view(np.uint8), out=c8)
            np.left_shift(c8, 15, out=c32, dtype=np.uint32)
            np.bitwise_or(c32, key_t.numpy().view(np.uint16), out=c32)
        else:
            code_t.copy_(me_t).mul_(2).add_(md_t).mul_(32768).add_(key_t)
        h = bincount(arr(code_t), 4 * 32768).reshape(4, 32768)
        h_all = h.sum(0)
        h_d, h_e = h[1] + h[3], h[2] + h[3]
        self.Hd += h_d
        self.He += h_e
        key, md, me = arr(key_t), arr(md_t), arr(me_t)
        pos_cache: dict[int, object] = {}
        for st in self.rank_plan.values():
            v, j, seen, _, _, done = st
            if done:
                continue
            c = int(h_all[v])
            if seen + c < j:
                st[2] += c
                st[3] += int(h_d[v])
                st[4] += int(h_e[v])
                continue
            r = j - seen
            if v not in pos_cache:
                eq = arr(self.bb[:L])
                if self.cpu:
                    np.equal(key, v, out=eq)
                else:
                    torch.eq(key, v, out=eq)
                pos_cache[v] = first_true(eq, c)
            pos = pos_cache[v][:r]
            st[3] += count(md[pos])
            st[4] += count(me[pos])
            st[5] = True

    def _changed_below(self) -> dict[int, tuple[int, int]]:
        """k → (|U_default ∩ k smallest|, |U_exact ∩ k smallest|) for every needed rank k."""
        ks = self._ranks_needed()
        out = {0: (0, 0), self.n: (self.counts_changed_d, self.counts["exact"])}
        if self.hist16:
            cd, ce = np.cumsum(self.Hd), np.cumsum(self.He)
            for k, (v, j, seen, td, te, done) in self.rank_plan.items():
                assert done, "rank threshold not resolved"
                out[k] = (int(cd[v] - self.Hd[v]) + td, int(ce[v] - self.He[v]) + te)
            return out
        # fp32/fp64: stable sort of |W_base| in input flat order
        a = self.w2b.abs().reshape(-1)
        perm = torch.sort(a, stable=True).indices
        del a
        for mask, slot in ((self.mask_d, 0), (self.mask_e, 1)):
            cs = torch.cumsum(mask[perm], 0).cpu().numpy()
            for k in ks:
                if 0 < k < self.n:
                    prev = out.get(k, (0, 0))
                    out[k] = (int(cs[k - 1]), prev[1]) if slot == 0 else (prev[0], int(cs[k - 1]))
        return out
