"""opdviz: see how post-training changed a model's weights.

The library streams a base and post-trained checkpoint pair, computes the structure of
ΔW = W_post − W_base per tensor (sparsity, magnitude, spectrum, geometry relative to the base),
and stores it in DuckDB for the Streamlit dashboard (``app.py``), the CLI (``opdviz --help``) and
this Python API (``opdviz.api``)::

    import opdviz
    run = opdviz.analyze("base/", "opd/", db="data/opdviz.duckdb", name="opd", method="OPD")
    store = opdviz.open("data/opdviz.duckdb")
    store.metrics(runs="opd", modules=["q", "down"])
    store.figure("sparsity.layerwise")

Importing opdviz is light: torch and the store load on first use.
"""

from opdviz.api import (
    MasksSummary,
    OverlapSummary,
    Results,
    RunSummary,
    TrajectorySummary,
    analyze,
    figure_names,
    load_masks,
    masks,
    open,
    overlap,
    train_only_masked,
    trajectory,
)
from opdviz.errors import OpdvizError
from opdviz.version import __version__


__all__ = ["analyze", "open", "overlap", "trajectory", "masks", "figure_names", "load_masks", "train_only_masked", "Results", "RunSummary",
           "OverlapSummary", "TrajectorySummary", "MasksSummary", "OpdvizError", "__version__"]
