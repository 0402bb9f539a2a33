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

import sys
import types

__version__ = "0.1.0"

from .api import (  # noqa: E402  (after __version__, which the job modules import)
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
from .errors import OpdvizError  # noqa: E402


class _Package(types.ModuleType):
    """Keeps the API functions ``overlap``, ``trajectory`` and ``masks`` bound on the package: the modules
    ``opdviz/overlap.py``, ``trajectory.py`` and ``masks.py`` share their names, and importing a submodule
    rebinds the package attribute of that name to the module (``opdviz.overlap(...)`` would then fail).
    Import the modules' own names with ``from opdviz.overlap import run_overlap``."""

    def __setattr__(self, name: str, value) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


_FUNCTIONS = ("overlap", "trajectory", "masks")
sys.modules[__name__].__class__ = _Package

__all__ = ["analyze", "open", "overlap", "trajectory", "masks", "figure_names", "load_masks", "train_only_masked", "Results", "RunSummary",
           "OverlapSummary", "TrajectorySummary", "MasksSummary", "OpdvizError", "__version__"]
