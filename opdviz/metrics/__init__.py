"""Per-pair metrics: pure functions of two tensors and the options; no I/O, no SQL.

``opdviz.metrics.pair.analyse_pair`` is the one entry the job calls: the elementwise pass (sparsity criteria,
magnitudes, coverage of low-magnitude coordinates, maps) on any tensor, then — for matrices —
the linear-algebra pass (ΔW spectrum, ranks, geometry relative to the base), which reuses the
changed masks of the first pass. Definitions live in each module's ``FAMILIES`` and the README.

Base work once: ``base_work`` is everything that depends on W_base alone (the elementwise prepass,
the base factorization); ``analyse_pair(…, base=…, coverage=False)`` then analyses one post against
it, and ``add_coverage`` computes the principal coverage of several posts of one base in one sweep
over the base's reconstructions. A pair alone runs the same code, so results are identical.

The package itself imports nothing, so that reading the catalog (``opdviz.metrics.registry``: names,
labels, units, pooling rules), as the views and the dashboard do, does not load torch.
"""
