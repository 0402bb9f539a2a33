"""The metric registry: every metric family, declared once.

The families of the computing modules (elementwise, spectral, geometry) are declared in
``opdviz.metrics.families``, apart from the code, so the catalog loads without torch; the adapter
metrics, read by ``opdviz.io.adapters``, are declared here as ``ADAPTER_FAMILIES`` (metrics imports
nothing from io). A family's ``family`` is the name
pattern used in code, in the store and in the UI, with ``{...}`` standing for one parameter
(``sparsity_{criterion}`` → ``sparsity_abs_1e-5``). The README table is generated from these.

Each family also carries its display ``label``, its ``unit`` (how every page, table and export shows
it: see ``UNITS`` and ``opdviz.views.formatting``) and its ``agg``, the rule by which per-tensor values are
pooled into a group or model-level number (``AGGREGATIONS``). ``DERIVED`` declares the same for the
numbers the views compute from stored metrics (overlap statistics, enrichment, baselines), so that
every number a user sees has exactly one definition of its label and unit.
"""

from __future__ import annotations

import functools
import re

from opdviz.metrics.families import ELEMENTWISE, GEOMETRY, SPECTRAL, MetricInfo


# unit → what a value means and how it is shown (formatting.py does the showing)
UNITS = {
    "fraction": "a share in [0, 1], shown in % (stored and exported as the fraction)",
    "percent": "already a percentage (0–100), shown with %",
    "ratio": "a dimensionless ratio, shown as a plain number (never ×100)",
    "count": "a count or rank (number of entries, singular directions)",
    "radians": "an angle, stored in radians, shown in degrees",
    "weight": "in the units of the weights",
    "weight²": "in squared weight units",
    "bytes": "a size in bytes, shown in KiB/MiB/GiB",
    "flag": "1 = yes, 0 = no",
    "text": "not a number",
}
# agg → how per-tensor values are pooled into a group (layer, module, run): "short name: rule". The short
# name (before the colon) is what an axis says the number is (``agg_label``); opdviz.store.summary.pool_sql computes it.
AGGREGATIONS = {
    "numel": "parameter-weighted: Σ value·numel / Σ numel (a share of entries)",
    "changed": "weighted by changed entries: Σ value·|U| / Σ |U|, U the run's changed mask (a share of U)",
    "changed_exact": "weighted by bitwise-changed entries: Σ value·|U| / Σ |U|, U the bitwise mask",
    "energy": "energy-weighted: Σ value·ΣΔW² / Σ ΣΔW² (a share of the update energy)",
    "pooled": "pooled: recomputed from the group's sums, sqrt(Σ ΣΔW²) / sqrt(Σ ΣW²) for the relative change, "
              "sqrt(Σ value²) for a Frobenius norm",
    "sum": "summed: Σ value",
    "max": "maximum over matrices: max value",
    "min": "minimum over matrices: min value",
    "matrix_mean": "mean over matrices: unweighted, each matrix counts once whatever its size",
    "counts": "from summed counts: recomputed from Σ|A|, Σ|B|, Σ|A∩B|, Σ numel",
    "none": "not aggregated: a per-tensor array",
}


def agg_label(agg: str) -> str:
    """What a pooled number is, in a few words (``parameter-weighted``, ``pooled``, ``mean over matrices``):
    the short name of ``AGGREGATIONS[agg]``."""
    return AGGREGATIONS[agg].split(":", 1)[0]


_OV = "opdviz.views.across (2606.13657, 2505.11711)"
# numbers the views derive from stored metrics or counts: declared here so they format like the rest
DERIVED: tuple[MetricInfo, ...] = (
    MetricInfo("p_a", "derived", "Density of run A's changed mask, |A|/numel.", _OV, "density A", "fraction", "counts"),
    MetricInfo("p_b", "derived", "Density of run B's changed mask, |B|/numel.", _OV, "density B", "fraction", "counts"),
    MetricInfo("jaccard", "derived", "|A∩B|/|A∪B|.", _OV, "Jaccard", "fraction", "counts"),
    MetricInfo("jaccard_baseline", "derived", "Jaccard of independent random masks, pApB/(pA+pB−pApB).", _OV,
               "Jaccard baseline", "fraction", "counts"),
    MetricInfo("cov_a", "derived", "|A∩B|/|A|: share of A's changes that B made too.", _OV, "|A∩B|/|A|",
               "fraction", "counts"),
    MetricInfo("cov_b", "derived", "|A∩B|/|B|.", _OV, "|A∩B|/|B|", "fraction", "counts"),
    MetricInfo("cov_a_baseline", "derived", "Independence baseline of cov_a, p_B.", _OV, "baseline p_B", "fraction",
               "counts"),
    MetricInfo("cov_b_baseline", "derived", "Independence baseline of cov_b, p_A.", _OV, "baseline p_A", "fraction",
               "counts"),
    MetricInfo("{stat}_ratio", "derived", "Observed ÷ independence baseline (1 = chance).", _OV,
               "observed ÷ baseline", "ratio", "counts"),
    MetricInfo("{kind}_enrichment_{alpha}", "derived", "Coverage ÷ α (1 = a random mask).", "2606.13657",
               "enrichment", "ratio", "changed"),
    MetricInfo("random_baseline_{alpha}", "derived", "Coverage of a random mask of α·numel entries: α.",
               "2606.13657", "random baseline", "fraction", "none"),
    MetricInfo("energy_share", "derived", "Group Σ ΔW² / the run's Σ ΔW² over the selection.", "2606.13657",
               "share of ‖ΔW‖²F", "fraction", "sum"),
    MetricInfo("numel", "derived", "Number of entries.", "opdviz", "entries", "count", "sum"),
    MetricInfo("changed", "derived", "Number of changed entries under the criterion.", "opdviz", "changed entries",
               "count", "sum"),
    MetricInfo("n_tensors", "derived", "Number of tensors.", "opdviz", "tensors", "count", "sum"),
    MetricInfo("{x}_bytes", "derived", "A size in bytes.", "opdviz", "bytes", "bytes", "sum"),
    MetricInfo("accuracy", "derived", "Task accuracy from the run's training metadata.", "runs.extra", "accuracy",
               "fraction", "none"),
    MetricInfo("base_accuracy", "derived", "Base model's task accuracy from the training metadata.", "runs.extra",
               "base accuracy", "fraction", "none"),
    MetricInfo("accuracy_gain", "derived", "accuracy − base_accuracy.", "runs.extra", "accuracy gain", "fraction",
               "none"),
)


# Stored for PEFT adapters by ``opdviz.io.adapters``, which reads them off the LoRA factors; declared here so
# that the catalog imports nothing from the readers (io imports metrics, never the reverse).
ADAPTER_FAMILIES: tuple[MetricInfo, ...] = (
    MetricInfo("adapter_rank", "scalar", "Rank r of the LoRA factors of this tensor (PEFT adapters only; "
               "rank_pattern applied).", "PEFT", "LoRA rank", "count", "max"),
    MetricInfo("adapter_scale", "scalar", "The LoRA scale of this tensor: lora_alpha/r, or lora_alpha/√r with "
               "rsLoRA (alpha_pattern/rank_pattern applied).", "PEFT", "LoRA scale", "ratio", "matrix_mean"),
    MetricInfo("adapter_spectrum", "array", "Singular values of the exact update scale·B·A (before the merge's "
               "rounding), descending, length r, from the r×r problem R_B·R_Aᵀ (QR of B and Aᵀ).", "PEFT",
               "LoRA spectrum", "weight", "none"),
)


def all_families() -> tuple[MetricInfo, ...]:
    """Every declared family: elementwise first, then spectral, geometry and the adapters'."""
    return ELEMENTWISE + SPECTRAL + GEOMETRY + ADAPTER_FAMILIES


def _pattern(family: str) -> re.Pattern:
    parts = re.split(r"\{[^}]*\}", family)
    return re.compile("(.+?)".join(re.escape(p) for p in parts) + r"\Z")


@functools.lru_cache(maxsize=4096)
def family_of(metric_name: str, derived: bool = False) -> MetricInfo:
    """The family a concrete metric name belongs to. A literal family (no ``{...}``) wins over a
    pattern, and among patterns the one with the longest literal text wins, so
    ``lowmag_coverage_exact_10pct`` maps to ``lowmag_coverage_exact_{alpha}``, not
    ``lowmag_coverage_{alpha}``. With ``derived``, the view-level numbers of ``DERIVED`` are matched too.
    Raises KeyError for an unknown name."""
    best: tuple[int, MetricInfo] | None = None
    for info in all_families() + (DERIVED if derived else ()):
        if info.family == metric_name:
            return info
        if "{" in info.family and _pattern(info.family).match(metric_name):
            score = len(re.sub(r"\{[^}]*\}", "", info.family))
            if best is None or score > best[0]:
                best = (score, info)
    if best is None:
        raise KeyError(f"no metric family matches {metric_name!r}")
    return best[1]


def markdown_table(families: tuple[MetricInfo, ...] | None = None) -> str:
    """The README's metric table: name, kind, unit, how groups pool it, definition, source."""
    rows = ["| metric | kind | unit | pooled over a group | definition | source |", "|---|---|---|---|---|---|"]
    for f in (all_families() if families is None else families):
        agg = "—" if f.agg == "none" else f.agg.replace("_", " ")
        rows.append(f"| `{f.family}` | {f.kind} | {f.unit} | {agg} | {f.doc} | {f.source} |")
    return "\n".join(rows)
