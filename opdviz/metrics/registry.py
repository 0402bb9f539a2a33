"""The metric registry: every metric family, declared once by the module that computes it.

Each metric module exposes ``FAMILIES: tuple[MetricInfo, ...]``; a family's ``family`` is the name
pattern used in code, in the store and in the UI, with ``{...}`` standing for one parameter
(``sparsity_{criterion}`` → ``sparsity_abs_1e-5``). The README table is generated from these.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

_MODULES = ("opdviz.metrics.elementwise", "opdviz.metrics.spectral", "opdviz.metrics.geometry", "opdviz.adapters")


@dataclass(frozen=True)
class MetricInfo:
    family: str     # name pattern, e.g. "sparsity_{criterion}", "lowmag_coverage_{alpha}"
    kind: str       # "scalar" | "array"
    doc: str        # one-sentence definition, with units / range
    source: str     # e.g. "arXiv 2505.11711"


def all_families() -> tuple[MetricInfo, ...]:
    """Every declared family: elementwise first, then spectral and geometry when importable."""
    out: list[MetricInfo] = []
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            if name == _MODULES[0]:
                raise
            continue
        out.extend(getattr(mod, "FAMILIES", ()))
    return tuple(out)


def _pattern(family: str) -> re.Pattern:
    parts = re.split(r"\{[^}]*\}", family)
    return re.compile("(.+?)".join(re.escape(p) for p in parts) + r"\Z")


def family_of(metric_name: str) -> MetricInfo:
    """The family a concrete metric name belongs to. A literal family (no ``{...}``) wins over a
    pattern, and among patterns the one with the longest literal text wins, so
    ``lowmag_coverage_exact_10pct`` maps to ``lowmag_coverage_exact_{alpha}``, not
    ``lowmag_coverage_{alpha}``. Raises KeyError for an unknown name."""
    best: tuple[int, MetricInfo] | None = None
    for info in all_families():
        if info.family == metric_name:
            return info
        if "{" in info.family and _pattern(info.family).match(metric_name):
            score = len(re.sub(r"\{[^}]*\}", "", info.family))
            if best is None or score > best[0]:
                best = (score, info)
    if best is None:
        raise KeyError(f"no metric family matches {metric_name!r}")
    return best[1]
