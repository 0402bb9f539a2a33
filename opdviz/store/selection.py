"""``Selection``: which runs, towers, layers, blocks and modules a read covers, and its SQL predicate.

Every read in ``opdviz.store`` that a page filters takes one; the views and the dashboard build it from
the sidebar, the API from ``opdviz.open(db).figure(..., runs=..., layers=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Selection:
    """Which rows a query covers. Empty tuples mean 'all'."""

    runs: tuple[str, ...] = ()
    towers: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    layer_min: int | None = None
    layer_max: int | None = None
    leaves_only: bool = True          # count fused tensors once (through their parts)
    extra: tuple[str, ...] = field(default=())   # tensor-name substrings to keep (any)

    def shape_where(self, alias: str) -> tuple[str, list]:
        """The predicate on where a tensor sits (tower, block, module, layer range) over any table with
        those columns aliased ``alias`` (``tensors``, ``overlap``); ``"true"`` when the selection has none."""
        clauses, params = ["true"], []
        for col, values in (("tower", self.towers), ("block", self.blocks), ("module", self.modules)):
            if values:
                clauses.append(f"{alias}.{col} IN ({', '.join('?' * len(values))})")
                params.extend(values)
        if self.layer_min is not None:
            clauses.append(f"({alias}.layer IS NULL OR {alias}.layer >= ?)")
            params.append(int(self.layer_min))
        if self.layer_max is not None:
            clauses.append(f"({alias}.layer IS NULL OR {alias}.layer <= ?)")
            params.append(int(self.layer_max))
        return " AND ".join(clauses), params

    def where(self, alias: str = "t") -> tuple[str, list]:
        """SQL predicate over the ``tensors`` view aliased ``alias``, with its parameters."""
        clauses, params = [f"{alias}.status = 'ok'"], []
        if self.runs:
            clauses.append(f"{alias}.run_id IN ({', '.join('?' * len(self.runs))})")
            params.extend(self.runs)
        shape, shape_params = self.shape_where(alias)
        clauses.append(shape)
        params.extend(shape_params)
        if self.leaves_only:
            clauses.append(f"NOT EXISTS (SELECT 1 FROM tensors c WHERE c.run_id = {alias}.run_id "
                           f"AND c.parent = {alias}.tensor AND c.status = 'ok')")
        if self.extra:
            clauses.append("(" + " OR ".join(f"{alias}.tensor LIKE ?" for _ in self.extra) + ")")
            params.extend(f"%{s}%" for s in self.extra)
        return " AND ".join(clauses), params
