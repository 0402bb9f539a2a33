"""The declared metric families of the computing modules: name pattern, kind, definition, source, label,
unit and pooling of every metric ``opdviz.metrics.elementwise``, ``spectral`` and ``geometry`` store.

Declarations only, apart from the code that computes them, so that the catalog (``opdviz.metrics.registry``)
and everything that reads it (views, dashboard, CLI listings) load without torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    """One metric family as the catalog (``opdviz.metrics.registry``) lists it."""

    family: str     # name pattern, e.g. "sparsity_{criterion}", "lowmag_coverage_{alpha}"
    kind: str       # "scalar" | "array" | "derived" (computed by the views, not stored per tensor)
    doc: str        # one-sentence definition, with units / range
    source: str     # e.g. "arXiv 2505.11711"
    label: str = ""          # short display label
    unit: str = "ratio"      # a key of UNITS
    agg: str = "matrix_mean"  # a key of AGGREGATIONS

_SRC_SPARSE = "arXiv 2505.11711"
_SRC_OPD = "arXiv 2606.13657"
_SRC_BF16 = "arXiv 2511.08567, arXiv 2606.07082"
_SPEC_SRC = "2505.11711, 2606.13657"
_PROJ_SRC = "2511.08567"
_ANG_SRC = "2511.08567, 2606.07082"
_COV_SRC = "2606.13657"

ELEMENTWISE: tuple[MetricInfo, ...] = (
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

SPECTRAL: tuple[MetricInfo, ...] = (
    MetricInfo("stable_rank", "scalar", "‖ΔW‖F² / σ₁² of ΔW (NaN when ΔW = 0).", _SPEC_SRC,
               label="stable rank", unit="count", agg="matrix_mean"),
    MetricInfo("effective_rank", "scalar", "exp of the entropy of p = σ/Σσ over the singular values of ΔW "
               "(NaN when ΔW = 0 or in approx mode).", _SPEC_SRC,
               label="effective rank", unit="count", agg="matrix_mean"),
    MetricInfo("numerical_rank_{t}", "scalar", "#{σᵢ > t·σ₁} of ΔW for t ∈ {1e-6, 1e-5, 1e-4} (0 when ΔW = 0; "
               "approx: NaN when the count reaches q).", _SPEC_SRC,
               label="numerical rank", unit="count", agg="matrix_mean"),
    MetricInfo("numerical_rank_{t}_pct", "scalar", "numerical_rank_{t} as % of min(m, n).", _SPEC_SRC,
               label="numerical rank, % of min(m, n)", unit="percent", agg="matrix_mean"),
    MetricInfo("numerical_rank_default", "scalar", "#{σᵢ > σ₁·max(m, n)·eps(float32)} of ΔW, "
               "torch.linalg.matrix_rank's default tolerance.", _SPEC_SRC,
               label="numerical rank (torch tolerance)", unit="count", agg="matrix_mean"),
    MetricInfo("numerical_rank_default_pct", "scalar", "numerical_rank_default as % of min(m, n).", _SPEC_SRC,
               label="numerical rank (torch tolerance), % of min(m, n)", unit="percent", agg="matrix_mean"),
    MetricInfo("top{k}_energy", "scalar", "Σ_{i≤k} σᵢ² / ‖ΔW‖F² for k ∈ {1, 2, 4, 8, 16, 32, 64}, k capped at "
               "min(m, n) (NaN when ΔW = 0).", _SPEC_SRC,
               label="top-k energy", unit="fraction", agg="matrix_mean"),
    MetricInfo("top_rank_{pct}_energy", "scalar", "Energy share of the top ceil(q·min(m, n)) singular values, "
               "q ∈ {1, 5, 10} %.", _SPEC_SRC,
               label="top-rank energy", unit="fraction", agg="matrix_mean"),
    MetricInfo("sigma_max", "scalar", "Largest singular value σ₁ of ΔW.", _SPEC_SRC,
               label="σ₁(ΔW)", unit="weight", agg="matrix_mean"),
    MetricInfo("spectrum_exact", "scalar", "1.0 when every σ was computed exactly, 0.0 for the randomized "
               "top-q (approx) spectrum.", _SPEC_SRC,
               label="spectrum exact (1) or approximate (0)", unit="flag", agg="min"),
    MetricInfo("spectrum", "array", "Singular values of ΔW, descending (length min(m, n); approx: q).", _SPEC_SRC,
               label="σ(ΔW)", unit="weight", agg="none"),
)

GEOMETRY: tuple[MetricInfo, ...] = (
    MetricInfo("principal_proj_{frac}", "scalar", "‖U_kᵀΔW V_k‖F²/‖ΔW‖F², U_k, V_k the top-k singular vectors of "
               "W_base, k = max(1, floor(frac·min(m, n))), frac ∈ {1, 5, 10, 20} %.", _PROJ_SRC,
               label="ΔW energy in the principal subspaces (joint)", unit="fraction", agg="matrix_mean"),
    MetricInfo("principal_proj_left_{frac}", "scalar", "‖U_kᵀΔW‖F²/‖ΔW‖F² (share in the top-k left base subspace).",
               _PROJ_SRC,
               label="ΔW energy in the left principal subspace", unit="fraction", agg="matrix_mean"),
    MetricInfo("principal_proj_right_{frac}", "scalar", "‖ΔW V_k‖F²/‖ΔW‖F² (share in the top-k right base "
               "subspace).", _PROJ_SRC,
               label="ΔW energy in the right principal subspace", unit="fraction", agg="matrix_mean"),
    MetricInfo("proj_joint_by_rank", "array", "Value i: principal_proj with k = i + 1, for every k (length "
               "min(m, n); approx: q).", _PROJ_SRC,
               label="joint projection share by rank", unit="fraction", agg="none"),
    MetricInfo("proj_left_by_rank", "array", "Value i: principal_proj_left with k = i + 1.", _PROJ_SRC,
               label="left projection share by rank", unit="fraction", agg="none"),
    MetricInfo("proj_right_by_rank", "array", "Value i: principal_proj_right with k = i + 1.", _PROJ_SRC,
               label="right projection share by rank", unit="fraction", agg="none"),
    MetricInfo("proj_joint_grid", "array", "proj_joint_by_rank at the fixed rank fractions r = k/min(m, n) = "
               "2^(−14 + i/4), i = 0…56 (linear in k between stored ranks; NaN outside 1/min(m, n) … stored "
               "length/min(m, n)): the by-rank curves on one grid for every shape.", _PROJ_SRC,
               label="joint projection share on the rank grid", unit="fraction", agg="matrix_mean"),
    MetricInfo("proj_left_grid", "array", "proj_left_by_rank on the same rank-fraction grid.", _PROJ_SRC,
               label="left projection share on the rank grid", unit="fraction", agg="matrix_mean"),
    MetricInfo("proj_right_grid", "array", "proj_right_by_rank on the same rank-fraction grid.", _PROJ_SRC,
               label="right projection share on the rank grid", unit="fraction", agg="matrix_mean"),
    MetricInfo("angle_left_mean_sin_k{k}", "scalar", "Mean sin θ of the principal angles between the top-k left "
               "singular subspaces of W_base and W_post, k ∈ {16, 64, 512} capped at min(m, n) (float64); NaN on a side "
               "whose whole space the k spans (k = m on the left, k = n on the right): R^k against itself gives 0 "
               "whatever the update, so the angle is undefined there.",
               _ANG_SRC,
               label="mean sin θ, left subspaces", unit="ratio", agg="matrix_mean"),
    MetricInfo("angle_left_max_rad_k{k}", "scalar", "Largest of those angles, radians.", _ANG_SRC,
               label="max principal angle, left", unit="radians", agg="matrix_mean"),
    MetricInfo("angle_right_mean_sin_k{k}", "scalar", "Same for the right singular subspaces.", _ANG_SRC,
               label="mean sin θ, right subspaces", unit="ratio", agg="matrix_mean"),
    MetricInfo("angle_right_max_rad_k{k}", "scalar", "Largest right principal angle, radians.", _ANG_SRC,
               label="max principal angle, right", unit="radians", agg="matrix_mean"),
    MetricInfo("angles_left_k{k}", "array", "The left principal angles, radians, ascending; length = the "
               "capped k.", _ANG_SRC,
               label="principal angles, left", unit="radians", agg="none"),
    MetricInfo("angles_right_k{k}", "array", "The right principal angles, radians, ascending.", _ANG_SRC,
               label="principal angles, right", unit="radians", agg="none"),
    MetricInfo("nss", "scalar", "Normalized spectral shift ‖σ(W_post) − σ(W_base)‖₂/‖σ(W_base)‖₂ (NaN in approx "
               "mode).", "2511.08567",
               label="normalised spectral shift", unit="ratio", agg="matrix_mean"),
    MetricInfo("base_spectrum", "array", "Singular values of W_base, descending (approx: top q).", "2511.08567",
               label="σ(W_base)", unit="weight", agg="none"),
    MetricInfo("post_spectrum", "array", "Singular values of W_post, descending (approx: top q).", "2511.08567",
               label="σ(W_post)", unit="weight", agg="none"),
    MetricInfo("principal_coverage_{alpha}", "scalar", "|M ∩ U|/|U|: U = default changed mask, M = the "
               "floor(α·numel) largest |rank-r reconstruction of W_base|, r = max(1, floor(α·min(m, n))), ties "
               "by flat index; NaN when U is empty. Random baseline = α.", _COV_SRC,
               label="principal coverage", unit="fraction", agg="changed"),
    MetricInfo("principal_coverage_exact_{alpha}", "scalar", "Same with U = exact (bitwise) changed mask.",
               _COV_SRC,
               label="principal coverage (bitwise mask)", unit="fraction", agg="changed_exact"),
    MetricInfo("principal_coverage_r{rank}_{alpha}", "scalar", "Principal coverage with the fixed reconstruction "
               "rank r = coverage_fixed_rank (capped at min(m, n)).", "2511.08567",
               label="principal coverage, fixed rank", unit="fraction", agg="changed"),
    MetricInfo("principal_coverage_r{rank}_exact_{alpha}", "scalar", "Fixed-rank principal coverage, exact mask.",
               "2511.08567",
               label="principal coverage, fixed rank (bitwise mask)", unit="fraction", agg="changed_exact"),
)
