"""Elementwise metrics of one tensor pair: which coordinates changed, by how much, and where.

Hot path of every job (every tensor goes through it), so it streams the pair in row chunks of
``opts.chunk_elems`` elements through preallocated buffers and fuses all criteria into one pass:

1. prepass over W_base: for bf16/fp16, an exact histogram of the 15-bit |W_base| patterns
   (bincount, no sort) gives Σ W_base² exactly, RMS(W_base) for the rel-RMS thresholds and the
   rank thresholds of the low-magnitude masks and deciles; fp32/fp64 only sum W_base².
2. main pass: ΔW in float32 from the stored values (float64 when stored fp64), every criterion's
   count, the two masks written in place, magnitude sums, a joint histogram of |W_base| patterns ×
   masks (for coverage/deciles; ties at a rank threshold are resolved in the chunk where the
   k-th element falls, by flat index order), and the top 16 bits of |ΔW| kept as int16 (2 B/elem).
3. post pass over those int16 buckets: the few elements in the buckets that hold a top-q
   boundary or a sweep threshold are gathered again and refined on their low 16 bits, so the
   top-q energy shares and the threshold sweep are exact without a sort.

This module holds the criteria, sparsity, magnitudes and maps; the rank/coverage part of the passes is
``opdviz.metrics.lowmag``, the top-q/sweep part ``opdviz.metrics.deltatop`` (mixins of one ``_Pass``).

Numerics: "exact" compares the stored bits (so -0.0 vs +0.0 counts as changed); the other
criteria compare |ΔW| with a threshold as if in float64 (thresholds are rounded down to the
largest float32 at or below them); bf16-η compares |ΔW| > fl(η·max(|W_base|, |W_post|)) in
ΔW's dtype. Sums are accumulated in float64 (float32 pairwise sums within a chunk).
On CPU the passes run on numpy views (4–10× faster than torch's elementwise ops here); on CUDA
they run in torch. fp32/fp64 inputs rank |W_base| with a stable sort (≈ 16 B/elem temporary) and
fp64 inputs also take ΔW's top-q and sweep from a full copy — both rare in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from opdviz.errors import TensorMismatchError
from opdviz.options import AnalysisOptions, fmt_pct
from opdviz.metrics.chunkops import INT_OF, arr, bincount, check_pair, count, floor32, gt, sumsq, total
from opdviz.metrics.deltatop import SWEEP_EPS, TOP_FRACS, DeltaTop
from opdviz.metrics.linalg import floor_frac
from opdviz.metrics.lowmag import NONFINITE_KEY, RankCoverage



@dataclass
class BaseStats:
    """The base-only part of the elementwise pass (its prepass), computed once per base tensor and shared
    by every post of a job: Σ W_base² and, for 16-bit floats, the exact histogram of the 15-bit |W_base|
    patterns that gives RMS(W_base) and the rank thresholds of the low-magnitude masks and deciles."""

    base_sq: float
    hist: np.ndarray | None            # int64[32768] (bf16/fp16), None for fp32/fp64


@dataclass
class ElementwiseResult:
    scalars: dict[str, float]
    arrays: dict[str, np.ndarray]          # float64 numpy arrays
    masks: dict[str, torch.Tensor]         # bool, input's shape and device: "default" and "exact"


def elementwise_metrics(wb: torch.Tensor, wp: torch.Tensor, opts: AnalysisOptions,
                        base: BaseStats | None = None) -> ElementwiseResult:
    """Every elementwise metric of one pair (names in ``opdviz.metrics.families.ELEMENTWISE``).

    ``wb``, ``wp``: same shape (1-D, or 2-D [out, in], any strides) and stored dtype (bf16, fp16,
    fp32, fp64), on one device; all work runs there. ``base``: ``base_stats(wb, opts)`` when already
    computed (results are identical either way). Returns float64 scalars/arrays and the "default"
    (``opts.criterion``) and "exact" changed masks. Raises TensorMismatchError for a bad pair or
    NaN/Inf values."""
    check_pair(wb, wp)
    p = _Pass(wb, wp, opts)
    return p.run(base if base is not None else p.prepass())


def base_stats(wb: torch.Tensor, opts: AnalysisOptions) -> BaseStats:
    """The prepass over W_base alone (see ``BaseStats``). Raises TensorMismatchError for NaN/Inf in a
    16-bit base."""
    check_pair(wb, wb)
    return _Pass(wb, wb, opts).prepass()


# ---------------------------------------------------------------------------------------------

class _Pass(RankCoverage, DeltaTop):
    """One pair's passes; holds the chunk buffers (allocated once) and the accumulators."""

    def __init__(self, wb: torch.Tensor, wp: torch.Tensor, opts: AnalysisOptions):
        self.opts = opts
        self.shape = tuple(wb.shape)
        self.dev = wb.device
        self.cpu = self.dev.type == "cpu"
        # [R, C] row-major view whose flat order is the input's flat order
        self.w2b, self.w2p = (wb, wp) if wb.dim() == 2 else (wb.unsqueeze(1), wp.unsqueeze(1))
        self.R, self.C = self.w2b.shape
        self.n = self.R * self.C
        self.dtype = wb.dtype
        self.idt = INT_OF[wb.dtype]
        self.fdt = torch.float64 if wb.dtype == torch.float64 else torch.float32
        self.hist16 = wb.dtype in (torch.bfloat16, torch.float16)
        self.rows = max(1, min(self.R, opts.chunk_elems // max(self.C, 1)))
        L = self.rows * self.C
        dev = self.dev
        self.raw_b = torch.empty(L, dtype=self.dtype, device=dev)   # used only for strided inputs
        self.raw_p = torch.empty(L, dtype=self.dtype, device=dev)
        self.fb = torch.empty(L, dtype=self.fdt, device=dev)
        self.fp = torch.empty(L, dtype=self.fdt, device=dev)
        self.fd = torch.empty(L, dtype=self.fdt, device=dev)
        self.bb = torch.empty(L, dtype=torch.bool, device=dev)
        self.mask_d = torch.empty(self.n, dtype=torch.bool, device=dev)
        self.mask_e = torch.empty(self.n, dtype=torch.bool, device=dev)
        if self.hist16:
            self.key = torch.empty(L, dtype=torch.int16, device=dev)
            self.code = torch.empty(L, dtype=torch.int32, device=dev)
            self.code8 = torch.empty(L, dtype=torch.uint8, device=dev) if self.cpu else None
        # top 16 bits of |ΔW| (float32), the whole tensor: 2 B/elem
        self.hi = torch.empty(self.n, dtype=torch.int16, device=dev) if self.fdt == torch.float32 else None
        self.tmp32 = torch.empty(L, dtype=torch.int32, device=dev) if not self.cpu else None

    # -- chunking ---------------------------------------------------------------------------------
    def _chunks(self):
        for i in range(0, self.R, self.rows):
            j = min(self.R, i + self.rows)
            yield i * self.C, (j - i) * self.C, i, j

    def _raw(self, w2: torch.Tensor, buf: torch.Tensor, i: int, j: int) -> torch.Tensor:
        block = w2[i:j]
        if block.is_contiguous():
            return block.reshape(-1)
        out = buf[:(j - i) * self.C]
        out.view(j - i, self.C).copy_(block)
        return out

    def _ints(self, raw: torch.Tensor):
        """Integer view of stored bits (numpy unsigned on CPU)."""
        v = raw.view(self.idt)
        if not self.cpu:
            return v
        a = v.numpy()
        return a.view({torch.int16: np.uint16, torch.int32: np.uint32, torch.int64: np.uint64}[self.idt])

    # -- the passes ------------------------------------------------------------------------------
    def run(self, stats: BaseStats) -> ElementwiseResult:
        base_sq = stats.base_sq
        self.H = stats.hist
        self.base_rms = math.sqrt(base_sq / self.n)
        self.base_sq = base_sq
        self._plan_criteria()
        if self.hist16:
            self._plan_ranks()
        self._main()
        scalars, arrays = self._finish()
        shape = self.shape
        masks = {"default": self.mask_d.view(shape), "exact": self.mask_e.view(shape)}
        return ElementwiseResult(scalars, arrays, masks)

    def prepass(self) -> BaseStats:
        if not self.hist16:
            tot = 0.0
            for off, L, i, j in self._chunks():
                fb = self.fb[:L]
                fb.copy_(self._raw(self.w2b, self.raw_b, i, j))
                tot += sumsq(arr(fb), arr(self.fd[:L]))
            return BaseStats(tot, None)
        H = np.zeros(32768, dtype=np.int64)
        for off, L, i, j in self._chunks():
            key = self._key(self._raw(self.w2b, self.raw_b, i, j), L)
            H += bincount(arr(key), 32768)
        lim = NONFINITE_KEY[self.dtype]
        if H[lim:].any():
            self._raise_nonfinite()
        return BaseStats(float(np.dot(H[:lim].astype(np.float64), self._key_values()[:lim] ** 2)), H)

    def _raise_nonfinite(self):
        raise TensorMismatchError(self._nonfinite_msg())

    def _nonfinite_msg(self) -> str:
        nb = int((~torch.isfinite(self.w2b)).sum())
        np_ = int((~torch.isfinite(self.w2p)).sum())
        what = (f"{nb + np_} NaN/Inf values (base {nb}, post {np_})" if nb or np_ else
                "ΔW overflows to Inf (values too large for the difference's dtype)")
        return f"{what} in a {tuple(self.shape)} {self.dtype} tensor: the checkpoint is corrupt or diverged"

    def _plan_criteria(self):
        o = self.opts
        cmp = (lambda t: floor32(t)) if self.fdt == torch.float32 else float
        self.thresh = [(name, cmp(x if kind == "abs" else x * self.base_rms))
                       for name, kind, x in o.thresholds() if kind in ("abs", "relrms")]
        self.etas = [(name, (np.float32(x) if self.fdt == torch.float32 else float(x)))
                     for name, kind, x in o.thresholds() if kind == "bf16"]
        self.counts = {c: 0 for c in o.criteria()}

    def _main(self):
        self.sum_abs = self.dsq = self.psq = 0.0
        self.dmax = 0.0
        self.Hhi = np.zeros(32768, dtype=np.int64)
        default = self.opts.criterion
        for off, L, i, j in self._chunks():
            tb = self._raw(self.w2b, self.raw_b, i, j)
            tp = self._raw(self.w2p, self.raw_p, i, j)
            md_t, me_t = self.mask_d[off:off + L], self.mask_e[off:off + L]
            md, me = arr(md_t), arr(me_t)
            bi, pi = self._ints(tb), self._ints(tp)
            if self.cpu:
                np.not_equal(bi, pi, out=me)
            else:
                torch.ne(bi, pi, out=me)
            self.counts["exact"] += count(me)
            if default == "exact":
                md[...] = me
            fb_t, fp_t, fd_t = self.fb[:L], self.fp[:L], self.fd[:L]
            fb_t.copy_(tb)
            fp_t.copy_(tp)
            fb, fp, fd, bb = arr(fb_t), arr(fp_t), arr(fd_t), arr(self.bb[:L])
            self.psq += sumsq(fp, fd)
            if self.cpu:
                np.subtract(fp, fb, out=fd)
                np.abs(fd, out=fd)
                mx = float(fd.max())
            else:
                torch.sub(fp_t, fb_t, out=fd_t)
                fd_t.abs_()
                mx = float(fd_t.max())
            if not math.isfinite(mx):
                raise TensorMismatchError(self._nonfinite_msg())
            self.dmax = max(self.dmax, mx)
            self.sum_abs += total(fd)
            for name, t in self.thresh:
                out = md if name == default else bb
                gt(fd, t, out)
                self.counts[name] += count(out)
            if self.etas:
                if self.cpu:
                    np.abs(fb, out=fb)
                    np.abs(fp, out=fp)
                    np.maximum(fb, fp, out=fb)
                else:
                    fb_t.abs_()
                    fp_t.abs_()
                    torch.maximum(fb_t, fp_t, out=fb_t)
                for name, eta in self.etas:
                    out = md if name == default else bb
                    if self.cpu:
                        np.multiply(fb, eta, out=fp)
                        np.greater(fd, fp, out=out)
                    else:
                        torch.mul(fb_t, float(eta), out=fp_t)
                        torch.gt(fd_t, fp_t, out=out)
                    self.counts[name] += count(out)
            # |ΔW|² last: fb/fp are free now
            self.dsq += sumsq(fd, fp)
            if self.hi is not None:
                self._store_hi(fd_t, off, L)
            if self.hist16:
                self._joint_hist(tb, L, md_t, me_t)

    # -- after the passes -------------------------------------------------------------------------
    def _finish(self):
        o, n = self.opts, self.n
        nan = float("nan")
        s: dict[str, float] = {}
        self.counts_changed_d = self.counts[o.criterion]
        for c in o.criteria():
            s[f"sparsity_{c}"] = 1.0 - self.counts[c] / n
        s["base_sq_sum"], s["post_sq_sum"], s["delta_sq_sum"] = self.base_sq, self.psq, self.dsq
        s["base_fro"], s["post_fro"], s["delta_fro"] = (math.sqrt(self.base_sq), math.sqrt(self.psq),
                                                        math.sqrt(self.dsq))
        s["rel_change"] = s["delta_fro"] / s["base_fro"] if self.base_sq > 0 else nan
        s["delta_max_abs"] = self.dmax
        s["delta_mean_abs"] = self.sum_abs / n
        s["delta_rms"] = math.sqrt(self.dsq / n)
        s["base_rms"] = self.base_rms

        cb = self._changed_below()
        ud, ue = self.counts_changed_d, self.counts["exact"]
        for a in o.coverage_alphas:
            k = floor_frac(a, n)
            s[f"lowmag_coverage_{fmt_pct(a)}"] = cb[k][0] / ud if ud else nan
            s[f"lowmag_coverage_exact_{fmt_pct(a)}"] = cb[k][1] / ue if ue else nan
        arrays: dict[str, np.ndarray] = {}
        for slot, name in ((0, "decile_density"), (1, "decile_density_exact")):
            dens = []
            for d in range(10):
                lo, hi = (d * n) // 10, ((d + 1) * n) // 10
                dens.append((cb[hi][slot] - cb[lo][slot]) / (hi - lo) if hi > lo else nan)
            arrays[name] = np.asarray(dens, dtype=np.float64)

        tops, sweep = self._top_and_sweep()
        for q, e in zip(TOP_FRACS, tops):
            s[f"coord_energy_top_{fmt_pct(q)}"] = e / self.dsq if self.dsq > 0 else nan
        arrays["abs_sweep_eps"] = np.asarray(SWEEP_EPS, dtype=np.float64)
        arrays["abs_sweep_sparsity"] = 1.0 - np.asarray(sweep, dtype=np.float64) / n
        if len(self.shape) == 2:
            arrays.update(self._maps())
        return {k: float(v) for k, v in s.items()}, arrays

    def _maps(self) -> dict[str, np.ndarray]:
        m, n, ms = self.R, self.C, self.opts.map_size
        bh, bw = -(-m // ms), -(-n // ms)
        col_starts = np.arange(0, n, bw)
        widths = np.diff(np.append(col_starts, n))
        U = self.mask_d.view(m, n)
        rows = np.empty(m, dtype=np.int64)
        cols = np.zeros(n, dtype=np.int64)
        blocks = []
        for i in range(0, m, bh):
            blk = U[i:i + bh]
            if self.cpu:
                b8 = blk.numpy().view(np.uint8)
                cs = b8.sum(0, dtype=np.int64)
                rows[i:i + len(b8)] = b8.sum(1, dtype=np.int64)
            else:
                cs = blk.sum(0).cpu().numpy()
                rows[i:i + blk.shape[0]] = blk.sum(1).cpu().numpy()
            cols += cs
            blocks.append(np.add.reduceat(cs, col_starts) / (blk.shape[0] * widths))
        return {"sparsity_map": np.asarray(blocks, dtype=np.float64),
                "row_changed_frac": rows / n, "col_changed_frac": cols / m}
