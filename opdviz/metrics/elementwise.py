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
import sys
from dataclasses import dataclass

import numpy as np
import torch

from opdviz.errors import TensorMismatchError
from opdviz.options import AnalysisOptions, fmt_num, fmt_pct
from opdviz.metrics.registry import MetricInfo

SWEEP_EPS = tuple(10.0 ** (-10 + 0.5 * i) for i in range(19))  # 10^(−10 + i/2): 1e-10 … 1e-1
TOP_FRACS = (0.001, 0.01, 0.05)
_SUBBLOCK = 1 << 20      # elements per block for numpy temporaries that widen to int64
# below this many elements a full |ΔW| copy is cheaper than the bucket refinement, whose fixed cost
# (65536-wide histograms per boundary bucket) dominates small tensors (~0.2 s each on a loaded CPU)
_SMALL_EXACT = 1 << 16
_SRC_SPARSE = "arXiv 2505.11711"
_SRC_OPD = "arXiv 2606.13657"
_SRC_BF16 = "arXiv 2511.08567, arXiv 2606.07082"

FAMILIES: tuple[MetricInfo, ...] = (
    MetricInfo("sparsity_{criterion}", "scalar", "Fraction of coordinates unchanged under a criterion, 0..1: "
               "exact (stored bits equal; −0.0 vs +0.0 counts as changed), abs_ε (|ΔW| ≤ ε), relrms_τ "
               "(|ΔW| ≤ τ·RMS(W_base)) or bf16_η (|ΔW| ≤ η·max(|W_base|, |W_post|)).",
               f"{_SRC_SPARSE} (exact, abs); {_SRC_OPD} (relrms); {_SRC_BF16} (bf16)",
               label="sparsity", unit="fraction", agg="numel"),
    MetricInfo("base_fro", "scalar", "Frobenius norm ‖W_base‖F.", _SRC_SPARSE,
               label="‖W_base‖F", unit="weight", agg="pooled"),
    MetricInfo("post_fro", "scalar", "Frobenius norm ‖W_post‖F.", _SRC_SPARSE,
               label="‖W_post‖F", unit="weight", agg="pooled"),
    MetricInfo("delta_fro", "scalar", "Frobenius norm ‖ΔW‖F.", _SRC_SPARSE,
               label="‖ΔW‖F", unit="weight", agg="pooled"),
    MetricInfo("rel_change", "scalar", "‖ΔW‖F / ‖W_base‖F (NaN when W_base = 0).", _SRC_SPARSE,
               label="relative change ‖ΔW‖F/‖W_base‖F", unit="ratio", agg="pooled"),
    MetricInfo("delta_max_abs", "scalar", "max |ΔW|.", _SRC_SPARSE,
               label="max |ΔW|", unit="weight", agg="max"),
    MetricInfo("delta_mean_abs", "scalar", "mean |ΔW| over all coordinates.", _SRC_SPARSE,
               label="mean |ΔW|", unit="weight", agg="numel"),
    MetricInfo("delta_rms", "scalar", "RMS of ΔW over all coordinates.", _SRC_SPARSE,
               label="RMS of ΔW", unit="weight", agg="matrix_mean"),
    MetricInfo("base_rms", "scalar", "RMS of W_base (the scale of the relrms criteria).", _SRC_OPD,
               label="RMS of W_base", unit="weight", agg="matrix_mean"),
    MetricInfo("delta_sq_sum", "scalar", "Σ ΔW² (float64), for numel-weighted group energy shares.", _SRC_SPARSE,
               label="Σ ΔW²", unit="weight²", agg="sum"),
    MetricInfo("base_sq_sum", "scalar", "Σ W_base² (float64), for group relative change.", _SRC_SPARSE,
               label="Σ W_base²", unit="weight²", agg="sum"),
    MetricInfo("post_sq_sum", "scalar", "Σ W_post² (float64).", _SRC_SPARSE,
               label="Σ W_post²", unit="weight²", agg="sum"),
    MetricInfo("coord_energy_top_{pct}", "scalar", "Share of Σ ΔW² held by the max(1, ⌈q·numel⌉) largest |ΔW|, "
               "q ∈ {0.1, 1, 5} %, 0..1 (NaN when ΔW = 0).", _SRC_SPARSE,
               label="share of ΣΔW² in the top coordinates", unit="fraction", agg="energy"),
    MetricInfo("lowmag_coverage_{alpha}", "scalar", "|M∩U|/|U|: share of the changed coordinates U (default "
               "criterion) among the ⌊α·numel⌋ smallest |W_base| (ties by flat index); random baseline α "
               "(NaN when U is empty).", _SRC_OPD,
               label="low-magnitude coverage", unit="fraction", agg="changed"),
    MetricInfo("lowmag_coverage_exact_{alpha}", "scalar", "Same as lowmag_coverage_{alpha} with U the exact "
               "(bitwise) changed mask.", _SRC_OPD,
               label="low-magnitude coverage (bitwise mask)", unit="fraction", agg="changed_exact"),
    MetricInfo("decile_density", "array", "10 values: changed fraction (default criterion) within each decile "
               "of |W_base| by rank (decile d = ranks [⌊d·n/10⌋, ⌊(d+1)·n/10⌋), ties by flat index).", _SRC_OPD,
               label="update density per |W_base| decile", unit="fraction", agg="numel"),
    MetricInfo("decile_density_exact", "array", "decile_density with the exact changed mask.", _SRC_OPD,
               label="update density per |W_base| decile (bitwise)", unit="fraction", agg="numel"),
    MetricInfo("sparsity_map", "array", "2-D only: changed fraction (default criterion) in blocks of "
               "⌈m/map_size⌉ × ⌈n/map_size⌉ coordinates (edge blocks averaged over their real size).", _SRC_OPD,
               label="changed share per block", unit="fraction", agg="none"),
    MetricInfo("row_changed_frac", "array", "2-D only: changed fraction (default criterion) of each row (m values).",
               _SRC_OPD,
               label="changed share per row", unit="fraction", agg="none"),
    MetricInfo("col_changed_frac", "array", "2-D only: changed fraction (default criterion) of each column "
               "(n values).", _SRC_OPD,
               label="changed share per column", unit="fraction", agg="none"),
    MetricInfo("abs_sweep_eps", "array", "The 19 absolute thresholds 1e-10 … 1e-1 (half-decades) of the sweep.",
               _SRC_SPARSE,
               label="threshold ε", unit="weight", agg="none"),
    MetricInfo("abs_sweep_sparsity", "array", "Sparsity (fraction with |ΔW| ≤ ε) at each abs_sweep_eps.",
               _SRC_SPARSE,
               label="sparsity at ε", unit="fraction", agg="numel"),
)

_INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16,
           torch.float32: torch.int32, torch.float64: torch.int64}
# First 15-bit |x| pattern that is Inf/NaN: bf16 exponent all ones, fp16 exponent all ones.
_NONFINITE_KEY = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
_LITTLE = sys.byteorder == "little"


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
    """Every elementwise metric of one pair (names in ``FAMILIES``).

    ``wb``, ``wp``: same shape (1-D, or 2-D [out, in], any strides) and stored dtype (bf16, fp16,
    fp32, fp64), on one device; all work runs there. ``base``: ``base_stats(wb, opts)`` when already
    computed (results are identical either way). Returns float64 scalars/arrays and the "default"
    (``opts.criterion``) and "exact" changed masks. Raises TensorMismatchError for a bad pair or
    NaN/Inf values."""
    _check_pair(wb, wp)
    p = _Pass(wb, wp, opts)
    return p.run(base if base is not None else p.prepass())


def base_stats(wb: torch.Tensor, opts: AnalysisOptions) -> BaseStats:
    """The prepass over W_base alone (see ``BaseStats``). Raises TensorMismatchError for NaN/Inf in a
    16-bit base."""
    _check_pair(wb, wb)
    return _Pass(wb, wb, opts).prepass()


# ---------------------------------------------------------------------------------------------
# small backend: the same calls on numpy views (CPU) or torch tensors (CUDA)

def _arr(t: torch.Tensor):
    return t.numpy() if t.device.type == "cpu" else t


def _count(x) -> int:
    return int(np.count_nonzero(x)) if isinstance(x, np.ndarray) else int(torch.count_nonzero(x))


def _gt(a, t, out):
    return np.greater(a, t, out=out) if isinstance(a, np.ndarray) else torch.gt(a, t, out=out)


def _first_true(mask, r: int):
    """Flat positions of the first r True values of a 1-D mask."""
    if isinstance(mask, np.ndarray):
        return np.flatnonzero(mask)[:r]
    return torch.nonzero(mask).flatten()[:r]


def _sumsq(x, tmp) -> float:
    if isinstance(x, np.ndarray):
        np.square(x, out=tmp)
        return float(np.sum(tmp))
    torch.square(x, out=tmp)
    return float(tmp.sum(dtype=torch.float64))


def _sum(x) -> float:
    return float(np.sum(x)) if isinstance(x, np.ndarray) else float(x.sum(dtype=torch.float64))


def _bincount(x, minlength: int) -> np.ndarray:
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    return torch.bincount(t, minlength=minlength).cpu().numpy()


def _floor32(t: float) -> np.float32:
    """Largest float32 ≤ t, so that ``x > _floor32(t)`` in float32 equals ``x > t`` in float64."""
    f = np.float32(t)
    return np.nextafter(f, np.float32(-np.inf)) if float(f) > t else f


def _floor_frac(frac: float, size: int) -> int:
    return int(math.floor(frac * size + 1e-9))     # robust to 0.29·100 = 28.999…


def _ceil_frac(frac: float, size: int) -> int:
    return int(math.ceil(frac * size - 1e-9))


def _check_pair(wb: torch.Tensor, wp: torch.Tensor) -> None:
    if wb.shape != wp.shape:
        raise TensorMismatchError(f"shape mismatch: base {tuple(wb.shape)} vs post {tuple(wp.shape)}; "
                                  "the checkpoints are not of the same architecture")
    if wb.dtype != wp.dtype:
        raise TensorMismatchError(f"dtype mismatch: base {wb.dtype} vs post {wp.dtype}; cast one checkpoint "
                                  "to the other's dtype before comparing")
    if wb.dtype not in _INT_OF:
        raise TensorMismatchError(f"dtype {wb.dtype} is not analysed (bf16, fp16, fp32, fp64 only)")
    if wb.dim() not in (1, 2):
        raise TensorMismatchError(f"elementwise metrics take 1-D or 2-D tensors, got shape {tuple(wb.shape)}; "
                                  "reshape stacks to [out, in] first")
    if wb.device != wp.device:
        raise TensorMismatchError(f"base on {wb.device} but post on {wp.device}")
    if wb.numel() == 0:
        raise TensorMismatchError("empty tensor: nothing to compare")


# ---------------------------------------------------------------------------------------------

class _Pass:
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
        self.idt = _INT_OF[wb.dtype]
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
                tot += _sumsq(_arr(fb), _arr(self.fd[:L]))
            return BaseStats(tot, None)
        H = np.zeros(32768, dtype=np.int64)
        for off, L, i, j in self._chunks():
            key = self._key(self._raw(self.w2b, self.raw_b, i, j), L)
            H += _bincount(_arr(key), 32768)
        lim = _NONFINITE_KEY[self.dtype]
        if H[lim:].any():
            self._raise_nonfinite()
        return BaseStats(float(np.dot(H[:lim].astype(np.float64), self._key_values()[:lim] ** 2)), H)

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
        k = np.arange(_NONFINITE_KEY[self.dtype], dtype=np.uint32)
        if self.dtype == torch.bfloat16:
            return (k << 16).view(np.float32).astype(np.float64)
        return k.astype(np.uint16).view(np.float16).astype(np.float64)

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
        cmp = (lambda t: _floor32(t)) if self.fdt == torch.float32 else float
        self.thresh = [(f"abs_{fmt_num(e)}", cmp(e)) for e in o.abs_eps]
        self.thresh += [(f"relrms_{fmt_num(t)}", cmp(t * self.base_rms)) for t in o.relrms_tau]
        self.etas = [(f"bf16_{fmt_num(h)}", (np.float32(h) if self.fdt == torch.float32 else float(h)))
                     for h in o.bf16_eta]
        self.counts = {c: 0 for c in o.criteria()}

    def _ranks_needed(self) -> list[int]:
        n = self.n
        ks = {_floor_frac(a, n) for a in self.opts.coverage_alphas} | {(d * n) // 10 for d in range(11)}
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

    def _main(self):
        self.sum_abs = self.dsq = self.psq = 0.0
        self.dmax = 0.0
        self.Hhi = np.zeros(32768, dtype=np.int64)
        default = self.opts.criterion
        for off, L, i, j in self._chunks():
            tb = self._raw(self.w2b, self.raw_b, i, j)
            tp = self._raw(self.w2p, self.raw_p, i, j)
            md_t, me_t = self.mask_d[off:off + L], self.mask_e[off:off + L]
            md, me = _arr(md_t), _arr(me_t)
            bi, pi = self._ints(tb), self._ints(tp)
            if self.cpu:
                np.not_equal(bi, pi, out=me)
            else:
                torch.ne(bi, pi, out=me)
            self.counts["exact"] += _count(me)
            if default == "exact":
                md[...] = me
            fb_t, fp_t, fd_t = self.fb[:L], self.fp[:L], self.fd[:L]
            fb_t.copy_(tb)
            fp_t.copy_(tp)
            fb, fp, fd, bb = _arr(fb_t), _arr(fp_t), _arr(fd_t), _arr(self.bb[:L])
            self.psq += _sumsq(fp, fd)
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
            self.sum_abs += _sum(fd)
            for name, t in self.thresh:
                out = md if name == default else bb
                _gt(fd, t, out)
                self.counts[name] += _count(out)
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
                    self.counts[name] += _count(out)
            # |ΔW|² last: fb/fp are free now
            self.dsq += _sumsq(fd, fp)
            if self.hi is not None:
                self._store_hi(fd_t, off, L)
            if self.hist16:
                self._joint_hist(tb, L, md_t, me_t)

    def _store_hi(self, fd_t: torch.Tensor, off: int, L: int):
        hi_t = self.hi[off:off + L]
        if self.cpu and _LITTLE:
            np.copyto(hi_t.numpy().view(np.uint16), fd_t.numpy().view(np.uint16)[1::2])
        else:
            torch.bitwise_right_shift(fd_t.view(torch.int32), 16, out=self.tmp32[:L])
            hi_t.copy_(self.tmp32[:L])
        self.Hhi += _bincount(_arr(hi_t), 32768)

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
        h = _bincount(_arr(code_t), 4 * 32768).reshape(4, 32768)
        h_all = h.sum(0)
        h_d, h_e = h[1] + h[3], h[2] + h[3]
        self.Hd += h_d
        self.He += h_e
        key, md, me = _arr(key_t), _arr(md_t), _arr(me_t)
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
                eq = _arr(self.bb[:L])
                if self.cpu:
                    np.equal(key, v, out=eq)
                else:
                    torch.eq(key, v, out=eq)
                pos_cache[v] = _first_true(eq, c)
            pos = pos_cache[v][:r]
            st[3] += _count(md[pos])
            st[4] += _count(me[pos])
            st[5] = True

    # -- after the passes -------------------------------------------------------------------------
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
            k = _floor_frac(a, n)
            s[f"lowmag_coverage_{fmt_pct(a)}"] = cb[k][0] / ud if ud else nan
            s[f"lowmag_coverage_exact_{fmt_pct(a)}"] = cb[k][1] / ue if ue else nan
        arrays: dict[str, np.ndarray] = {}
        for slot, name in ((0, "decile_density"), (1, "decile_density_exact")):
            dens = []
            for d in range(10):
                lo, hi = (d * n) // 10, ((d + 1) * n) // 10
                dens.append((cb[hi][slot] - cb[lo][slot]) / (hi - lo) if hi > lo else nan)
            arrays[name] = np.asarray(dens, dtype=np.float64)

        if self.hi is not None and self.n > _SMALL_EXACT:
            tops, sweep = self._refine_delta()
        else:
            tops, sweep = self._delta_full()
        for q, e in zip(TOP_FRACS, tops):
            s[f"coord_energy_top_{fmt_pct(q)}"] = e / self.dsq if self.dsq > 0 else nan
        arrays["abs_sweep_eps"] = np.asarray(SWEEP_EPS, dtype=np.float64)
        arrays["abs_sweep_sparsity"] = 1.0 - np.asarray(sweep, dtype=np.float64) / n
        if len(self.shape) == 2:
            arrays.update(self._maps())
        return {k: float(v) for k, v in s.items()}, arrays

    def _refine_delta(self) -> tuple[list[float], list[int]]:
        """Exact top-q energies and sweep counts from the int16 |ΔW| buckets plus a refinement of
        the boundary buckets on the low 16 bits (only those elements are gathered again)."""
        n, H = self.n, self.Hhi
        above_or_eq = np.cumsum(H[::-1])[::-1]          # count(hi ≥ h)
        plan_q = []
        for q in TOP_FRACS:
            k = max(1, _ceil_frac(q, n))
            B = int(np.nonzero(above_or_eq >= k)[0][-1])
            plan_q.append((B, k - int(above_or_eq[B] - H[B])))
        sweep_bits = [int(_floor32(e).view(np.uint32)) for e in SWEEP_EPS]
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
            k = max(1, _ceil_frac(q, self.n))
            tops.append(float((torch.topk(d, k).values ** 2).sum()))
        sweep = [int((d > e).sum()) for e in SWEEP_EPS]
        return tops, sweep

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
