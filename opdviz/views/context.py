"""The types every figure build shares: page choices (``ViewContext``, ``AcrossContext``) and ``FigureSpec``.

A build is a function ``(store, selection, context) → (figure, data behind it)``; ``opdviz.views.registry``
lists every one with its page, title and caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
import plotly.graph_objects as go

from opdviz.store import Selection, Store


@dataclass(frozen=True)
class ViewContext:
    """Page-level choices besides the shared ``Selection``."""

    criterion: str = "abs_1e-5"
    tensor: str | None = None                 # Tensor page drill-down (None → largest layer matrix)
    tensors: tuple[str, ...] = ()             # Spectra/Geometry chosen tensors (empty → middle-layer q and down)
    metric: str = "sparsity"                  # Compare page metric (a group_summary column or a catalog metric)
    run_a: str | None = None                  # Compare difference heatmap: run_b − run_a
    run_b: str | None = None


@dataclass(frozen=True)
class FigureSpec:
    key: str
    page: str
    title: str
    caption: str
    build: Callable[[Store, Selection, ViewContext], tuple[go.Figure, pd.DataFrame]]


@dataclass(frozen=True)
class AcrossContext:
    """Page choices for the overlap and trajectory pages (None → the first stored pair / trajectory)."""

    criterion: str = "abs_1e-5"
    run_a: str | None = None
    run_b: str | None = None
    trajectory: str | None = None
    metric: str = "sparsity"            # trajectory page: per-step metric


def across_context(ctx) -> AcrossContext:
    """``ctx`` as an ``AcrossContext``: a plain ``ViewContext`` gives its criterion, run_a and run_b."""
    if isinstance(ctx, AcrossContext):
        return ctx
    return AcrossContext(criterion=getattr(ctx, "criterion", "abs_1e-5"), run_a=getattr(ctx, "run_a", None),
                         run_b=getattr(ctx, "run_b", None))
