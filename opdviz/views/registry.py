"""The figure registry: every figure of the dashboard, ``opdviz figures`` and ``opdviz.open(db).figure(name)``.

One ``FigureSpec`` per figure (key, page, title, caption, build), in the order of the dashboard's pages; the
builds live in one module per page group (``sparsity``, ``spectra``, ``tensor``, ``compare``, ``across``).
Figures of ``RUN_PAGES`` take a ``ViewContext``, those of ``ACROSS_PAGES`` an ``AcrossContext``.

    from opdviz.views.registry import figure_spec
    fig, df = figure_spec("sparsity.layerwise").build(store, Selection(), ViewContext())
"""

from __future__ import annotations

from opdviz.views import across as A
from opdviz.views import compare as C
from opdviz.views import sparsity as SP
from opdviz.views import spectra as SC
from opdviz.views import tensor as T
from opdviz.views.context import FigureSpec

RUN_PAGES = ("overview", "sparsity", "spectra", "geometry", "tensor", "compare")
ACROSS_PAGES = ("overlap", "trajectory")
PAGES = RUN_PAGES + ACROSS_PAGES

_CRIT = "An entry counts as changed under the chosen criterion (default |ΔW| > 1e-5); sparsity = share unchanged."
FIGURES: tuple[FigureSpec, ...] = (
    # ---- one run (or several side by side): a ViewContext
    FigureSpec("overview.sparsity_heatmap", "overview", "Sparsity by layer and module",
               "Share of entries of ΔW = W_post − W_base left unchanged, per layer (rows) and module (columns), "
               "one panel per run, numel-weighted over fused parts. " + _CRIT, SP.sparsity_heatmap),
    FigureSpec("overview.energy_share", "overview", "Update energy per module",
               "Share of each run's squared Frobenius norm ‖ΔW‖²_F held by each module type, summed over layers "
               "(bars sum to 100 % per run).", SP.energy_share),
    FigureSpec("overview.coverage", "overview", "Low-magnitude and principal coverage",
               "Coverage |M_α ∩ U| / |U| of the changed set U by the α·numel smallest-|W_base| entries "
               "(low-magnitude) and by the α·numel largest entries of the rank-⌊α·min(m,n)⌋ reconstruction of "
               "W_base (principal), pooled over matrices by |U|. Dotted: random baseline coverage = α; "
               "enrichment = coverage/α.", SP.coverage),
    FigureSpec("sparsity.layerwise", "sparsity", "Layerwise sparsity per projection",
               "Share of entries unchanged per layer, one line per module, one panel per run. " + _CRIT, SP.layerwise),
    FigureSpec("sparsity.criteria", "sparsity", "Sparsity under each criterion",
               "Numel-weighted share of entries unchanged under every stored criterion: bitwise, absolute "
               "thresholds ε, thresholds relative to RMS(W_base), and the bf16-resolution test "
               "|ΔW| > η·max(|W_base|, |W_post|).", SP.criteria),
    FigureSpec("sparsity.sweep", "sparsity", "Sparsity against threshold",
               "Share of entries with |ΔW| ≤ ε against ε (log scale), numel-weighted over the selection; the dotted "
               "line marks the chosen criterion.", SP.sweep),
    FigureSpec("sparsity.deciles", "sparsity", "Update density by magnitude decile",
               "Share of entries changed within each decile of |W_base| (1 = smallest magnitudes), divided by the "
               "tensor's mean density; 1 (dotted) = no preference for small or large weights.", SP.deciles),
    FigureSpec("sparsity.rel_change_heatmap", "sparsity", "Relative change by layer and module",
               "‖ΔW‖_F / ‖W_base‖_F per layer and module, pooled as sqrt(ΣΔ²)/sqrt(ΣW²), in units of 10⁻³.",
               SP.rel_change_heatmap),
    FigureSpec("spectra.normalised", "spectra", "Normalised ΔW spectra",
               "Singular values σᵢ of ΔW divided by σ₁, log–log, for the chosen tensors (default: a middle-layer "
               "attention q and FFN down projection).", SC.spectra),
    FigureSpec("spectra.cumulative", "spectra", "Cumulative spectral energy",
               "Σ_{j≤i} σⱼ² / ‖ΔW‖²_F against the number of singular directions i (log scale); a low-rank update "
               "reaches 100 % early.", SC.cumulative),
    FigureSpec("spectra.topk", "spectra", "Top-k energy",
               "Share of ‖ΔW‖²_F in the top k singular directions, k = 1…64, mean over matrices.", SC.topk),
    FigureSpec("spectra.stable_rank", "spectra", "Stable rank by layer and module",
               "Stable rank ‖ΔW‖²_F / σ₁² per layer (log scale), one line per module, one panel per run; "
               "mean over matrices in a cell.", SC.stable_rank),
    FigureSpec("geometry.principal_projection", "geometry", "Projection on principal subspaces",
               "Share of ‖ΔW‖²_F inside the top-k singular subspaces of W_base against r = k/min(m,n): joint "
               "‖U_kᵀΔW V_k‖²_F, left ‖U_kᵀΔW‖²_F, right ‖ΔW V_k‖²_F, mean over matrices. Dotted: an isotropic "
               "random ΔW of a square matrix (r one-sided, r² joint; k/m, k/n, k²/mn for m×n).",
               SC.principal_projection),
    FigureSpec("geometry.angles", "geometry", "Principal angles",
               "Principal angles (degrees) between the top-k left and right singular subspaces of W_base and "
               "W_post, computed in float64, for the chosen tensor (the largest stored k below min(m, n): at a k that spans a side's whole space the angles are undefined and stored as NaN).", SC.angles),
    FigureSpec("geometry.nss_heatmap", "geometry", "Normalised spectral shift",
               "NSS = ‖σ(W_post) − σ(W_base)‖ / ‖σ(W_base)‖ per layer and module (×10⁻³), one panel per run.",
               SC.nss_heatmap),
    FigureSpec("geometry.coverage_variants", "geometry", "Coverage variants",
               "Principal coverage with the mask from the rank-⌊α·min(m,n)⌋ (2606.13657) and rank-64 (2511.08567) "
               "reconstructions of W_base, and low-magnitude coverage of the bitwise-changed set; dotted: "
               "random baseline = α.", SC.coverage_variants),
    FigureSpec("tensor.sparsity_map", "tensor", "Changed-entry map",
               "Share of entries changed in blocks of the matrix (at most 128×128 blocks), with the per-column "
               "(top) and per-row (right) changed shares, for the chosen tensor and the first selected run.",
               T.tensor_map),
    FigureSpec("tensor.spectrum", "tensor", "Tensor ΔW spectrum",
               "Singular values of ΔW for the chosen tensor, σᵢ/σ₁, log–log, one line per run.", T.tensor_spectrum),
    FigureSpec("tensor.angles", "tensor", "Tensor principal angles",
               "Principal angles (degrees) between W_base and W_post singular subspaces for the chosen tensor.",
               T.tensor_angles),
    FigureSpec("tensor.sweep", "tensor", "Tensor sparsity against threshold",
               "Share of entries of the chosen tensor with |ΔW| ≤ ε, against ε (log scale).", T.tensor_sweep),
    FigureSpec("tensor.deciles", "tensor", "Tensor update density by decile",
               "Update density per decile of |W_base| for the chosen tensor, relative to its mean (1 = uniform).",
               T.tensor_deciles),
    FigureSpec("compare.bars", "compare", "Metric per module",
               "The chosen metric per module for each run, pooled over the module's matrices by the metric's own "
               "rule from the catalog (the axis says which: parameter-weighted for sparsity, weighted by the changed "
               "entries for coverage, energy-weighted for coordinate energy, pooled sums for relative change, the "
               "mean over matrices for spectral and geometry scalars).", C.compare_bars),
    FigureSpec("compare.layerwise", "compare", "Metric by layer",
               "The chosen metric per layer, one line per run (colour = method), pooled over the layer's matrices "
               "by the metric's catalog rule.", C.compare_layerwise),
    FigureSpec("compare.difference", "compare", "Difference heatmap",
               "Run B minus run A for the chosen metric, per layer and module; diverging colour scale centred on 0 "
               "(purple: B higher, orange: A higher).", C.compare_difference),
    # ---- across runs and along trajectories: an AcrossContext
    FigureSpec("overlap.coverage", "overlap", "Coverage of one run's mask by the other",
               "|A∩B|/|A|: of the entries run A changed, the share run B changed too; its independence baseline is "
               "B's density p_B (and symmetrically). Counts are summed per layer and module (numel-weighted).",
               A.cov_heatmap),
    FigureSpec("overlap.jaccard", "overlap", "Jaccard overlap",
               "|A∩B|/|A∪B| of the two changed masks, next to the value two independent random masks of the same "
               "densities would give, p_A·p_B/(p_A+p_B−p_A·p_B).", A.jaccard_heatmap),
    FigureSpec("overlap.ratio", "overlap", "Observed ÷ baseline",
               "log₂ of how many times more overlap than chance: 0 = independent masks, +1 = twice chance, −1 = half "
               "(diverging colours centred on 0).",
               A.ratio_heatmap),
    FigureSpec("overlap.criteria", "overlap", "Overlap under each criterion",
               "Whole-selection Jaccard and coverages for every stored criterion (log scale), thin grey bars = "
               "independence baselines.", A.by_criterion),
    FigureSpec("trajectory.step_metric", "trajectory", "Per-pair metric by step",
               "A metric of the per-step runs (each checkpoint vs the base) per module against the training step.",
               A.step_metric),
    FigureSpec("trajectory.sim_k", "trajectory", "Subspace locking",
               "Sim_K(t) = (1/K)‖V_K(t)ᵀV_K(T)‖F², V_K the top-K right singular vectors of Δ_t = W_t − W_base; "
               "1 = the update already points where it ends (arXiv 2606.07082). Mean over matrices.", A.sim_k),
    FigureSpec("trajectory.consecutive", "trajectory", "Consecutive-step sparsity",
               "Share of entries unchanged between checkpoint t−1 and t (the base before the first), numel-weighted.",
               A.consecutive),
    FigureSpec("trajectory.outside_final", "trajectory", "Updates outside the final mask",
               "Of the entries changed at step t (vs the base), the share the final checkpoint leaves unchanged: "
               "transient updates. Weighted by the changed counts.", A.outside_final),
    FigureSpec("trajectory.hill", "trajectory", "Heavy-tail exponent",
               "Hill estimate α̂ = 1 + k/Σ ln(λ_i/λ_{k+1}) over the top 10 % eigenvalues λ = σ² of Δ_tᵀΔ_t "
               "(density exponent; smaller = heavier tail).", A.hill),
)


def figures_for(page: str) -> tuple[FigureSpec, ...]:
    """The FigureSpecs of one page, in display order."""
    if page not in PAGES:
        raise ValueError(f"unknown page {page!r}; pages are {', '.join(PAGES)}")
    return tuple(f for f in FIGURES if f.page == page)


def figure_spec(key: str) -> FigureSpec:
    """The FigureSpec named ``key``; KeyError (listing the names) when there is none."""
    for f in FIGURES:
        if f.key == key:
            return f
    raise KeyError(f"no figure {key!r}; known: {', '.join(f.key for f in FIGURES)}")
