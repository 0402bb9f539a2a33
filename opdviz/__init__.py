"""opdviz: see how post-training changed a model's weights.

The library streams a base and post-trained checkpoint pair, computes the structure of
ΔW = W_post − W_base per tensor (sparsity, magnitude, spectrum, geometry relative to the base),
and stores it in DuckDB for the Streamlit dashboard (``app.py``). Entry point: ``opdviz --help``.
"""

__version__ = "0.1.0"
