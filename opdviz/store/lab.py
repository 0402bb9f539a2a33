"""Reads of the lab sweep's runs (``opdviz lab sweep``): one row per run and block, for ``opdviz.views.lab``."""

from __future__ import annotations

import pandas as pd

from opdviz.options import LAB_CRITERIA
from opdviz.store.core import Store
from opdviz.store.selection import Selection

def lab_runs(store: Store) -> pd.DataFrame:
    """Runs written by ``opdviz lab sweep`` (``runs.extra`` has ``"sweep": true``), one row per run and block:
    run_id, method, status, extra (JSON text), block, numel, delta_sq (ΣΔ²), base_sq (ΣW²), per-criterion numel-weighted sparsity
    ``sparsity_<criterion>`` for ``opdviz.options.LAB_CRITERIA``, rel_change (sqrt(ΣΔ²)/sqrt(ΣW²)) and ``principal_proj_10pct``
    (ΔW energy share in the top-10 % principal subspaces of W_base, ‖ΔW‖²-weighted over matrices)."""
    per_crit = "".join(f", max(CASE WHEN m.metric = 'sparsity_{c}' THEN m.value END) AS \"s_{c}\"" for c in LAB_CRITERIA)
    agg_crit = "".join(f", sum(per.\"s_{c}\" * per.numel) / nullif(sum(CASE WHEN per.\"s_{c}\" IS NOT NULL "
                       f"THEN per.numel END), 0) AS \"sparsity_{c}\"" for c in LAB_CRITERIA)
    where, params = Selection().where("t")
    return store.query(f"""
        WITH lab AS (SELECT run_id, method, status, extra FROM runs
                     WHERE json_extract(extra, '$.sweep')::VARCHAR = 'true'),
        per AS (
            SELECT t.run_id, t.block, t.tensor, t.numel,
                   max(CASE WHEN m.metric = 'delta_sq_sum' THEN m.value END) AS dsq,
                   max(CASE WHEN m.metric = 'base_sq_sum' THEN m.value END) AS bsq,
                   max(CASE WHEN m.metric = 'principal_proj_10pct' THEN m.value END) AS proj
                   {per_crit}
            FROM tensors t JOIN metrics m USING (run_id, tensor)
            WHERE {where} AND t.run_id IN (SELECT run_id FROM lab)
            GROUP BY t.run_id, t.block, t.tensor, t.numel)
        SELECT lab.run_id, lab.method, lab.status, lab.extra, per.block, sum(per.numel) AS numel
               {agg_crit}, sum(per.dsq) AS delta_sq, sum(per.bsq) AS base_sq,
               sqrt(sum(per.dsq)) / nullif(sqrt(sum(per.bsq)), 0) AS rel_change,
               sum(per.proj * per.dsq) / nullif(sum(CASE WHEN per.proj IS NOT NULL THEN per.dsq END), 0)
                   AS principal_proj_10pct
        FROM lab JOIN per USING (run_id)
        GROUP BY lab.run_id, lab.method, lab.status, lab.extra, per.block
        ORDER BY lab.run_id, per.block""", params)
