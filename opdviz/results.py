"""Reading a store from Python: ``Results`` (what ``opdviz.open(db)`` returns) and the figure names.

Read-only by construction: every method queries the store through ``opdviz.store`` and the
views of ``opdviz.views`` (the same functions the CLI and the dashboard use) and nothing here writes.

    store = opdviz.open("data/opdviz.duckdb")
    store.metrics(runs="opd", layers=range(4), modules=["q", "down"], metrics="sparsity_*")
    store.figure("overlap.jaccard", run_a="opd", run_b="rl")
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any, Sequence

from opdviz.errors import OptionsError
from opdviz.options import AnalysisOptions


def figure_names() -> list[str]:
    """Every figure ``Results.figure`` can draw, in the order of the dashboard's pages (the list
    ``opdviz figures --list`` prints)."""
    from opdviz.views.registry import FIGURES

    return [f.key for f in FIGURES]


class Results:
    """A read-only view of a store: runs, metrics, overlap and trajectory tables, figures.

    Every method queries the store afresh, so a store that a job is still writing shows its progress.
    """

    # figure keyword filters → what they set (documented in ``figure``)
    FIGURE_FILTERS = ("methods", "towers", "blocks", "modules", "layers", "criterion", "tensor", "tensors",
                      "metric", "run_a", "run_b", "trajectory")

    def __init__(self, store):
        self._store = store

    @property
    def path(self) -> Path:
        """The store's ``.duckdb`` path."""
        return self._store.db_path

    def __repr__(self) -> str:
        return f"opdviz.open({str(self.path)!r})"

    def runs(self):
        """One row per run (pandas DataFrame), oldest first: run_id, method, kind (pair, trajectory,
        reference), status, counts, device, wall_s (seconds), paths, fingerprints, options (JSON)…
        A run whose process is gone reads as ``interrupted``."""
        from opdviz.store.queries import runs

        return runs(self._store)

    def metrics(self, runs: str | Sequence[str] | None = None, methods: str | Sequence[str] | None = None,
                layers: int | Sequence[int] | None = None, modules: str | Sequence[str] | None = None,
                blocks: str | Sequence[str] | None = None, metrics: str | Sequence[str] | None = None, *,
                towers: str | Sequence[str] | None = None):
        """Stored per-tensor metrics as a tidy DataFrame, one row per (run, tensor, metric) — the rows and
        values ``opdviz metrics`` exports for the same selection.

        Args (each one value or a list; None = all):
            runs: run names. methods: method labels. layers: layer indices (tensors without a layer —
            embeddings, head, final norm — are left out when given). modules: q, k, v, o, gate, up, down…
            blocks: attn, ffn, embed, head, norm… metrics: metric names, or globs such as
            ``"sparsity_*"``. towers: text, vision.

        Returns:
            Columns run, method, tensor, tower, layer (nullable int), block, module, metric, value
            (float64, in the metric's unit: README "Metrics"). Every ok tensor, fused parts included.

        Raises:
            OptionsError when a given run, method, layer, module, block, tower or metric is not in the
            store (the message lists what is).
        """
        from opdviz.store.queries import export_rows, selection_values

        sel = {"runs": _strs(runs, "runs"), "methods": _strs(methods, "methods"), "towers": _strs(towers, "towers"),
               "layers": _ints(layers, "layers"), "blocks": _strs(blocks, "blocks"),
               "modules": _strs(modules, "modules"), "metrics": _strs(metrics, "metrics")}
        if any(sel.values()):
            _check_known(sel, selection_values(self._store), self.path)
        return export_rows(self._store, **sel)

    def figure(self, name: str, runs: str | Sequence[str] | None = None, **filters: Any):
        """One figure of the dashboard as a ``plotly.graph_objects.Figure`` (displays inline in Jupyter).

        Args:
            name: a name from ``figure_names()`` (e.g. ``"sparsity.layerwise"``, ``"overlap.jaccard"``).
            runs: run names (default: every run except trajectory steps, as the dashboard shows).
            **filters: methods, towers, blocks, modules (lists); layers (an int, a list or range of
                consecutive layers; tensors without a layer are kept, as in the dashboard); criterion
                (e.g. ``"abs_1e-6"``); tensor (Tensor page); tensors (Spectra/Geometry pages); metric
                (Compare / Trajectory pages); run_a, run_b (Compare difference, Overlap pages); trajectory.

        Returns:
            The figure; on a selection without data, a figure that says so.
        """
        return self._build(name, runs, filters)[0]

    def figure_data(self, name: str, runs: str | Sequence[str] | None = None, **filters: Any):
        """The DataFrame behind ``figure(name, runs, **filters)`` (what the CSV exports hold)."""
        return self._build(name, runs, filters)[1]

    def figure_names(self) -> list[str]:
        """Every figure name ``figure`` accepts (same as ``opdviz.figure_names()``)."""
        return figure_names()

    def overlap(self, run_a: str | None = None, run_b: str | None = None, *, criterion: str | None = "abs_1e-5",
                by: str = "layer_module"):
        """Mask-overlap statistics of stored pairs (all pairs when ``run_a``/``run_b`` are None).

        Args:
            criterion: one criterion, or None for every stored one.
            by: grouping: all, layer, module, block, layer_module or tensor.

        Returns:
            run_a, run_b, the group keys, criterion, n_tensors, numel, n_a, n_b, n_ab, p_a, p_b, jaccard,
            cov_a = |A∩B|/|A|, cov_b = |A∩B|/|B|, each with ``*_baseline`` (independent masks of the same
            densities) and ``*_ratio`` (observed ÷ baseline). Fractions are 0..1.
        """
        import pandas as pd

        from opdviz.store.across import overlap_pairs
        from opdviz.views.across import GROUPS, overlap_groups

        if by not in GROUPS:
            raise OptionsError(f"by must be one of {', '.join(GROUPS)}, not {by!r}")
        pairs = overlap_pairs(self._store)
        keep = [(a, b) for a, b in zip(pairs["run_a"], pairs["run_b"])
                if (run_a is None or a == run_a) and (run_b is None or b == run_b)]
        if (run_a or run_b) and not keep:
            known = ", ".join(f"{a} ∩ {b}" for a, b in zip(pairs["run_a"], pairs["run_b"])) or "none"
            raise OptionsError(f"no overlap of {run_a or 'any run'} and {run_b or 'any run'} in {self.path} "
                               f"(stored pairs: {known}); compute it with opdviz.overlap(...)")
        frames = [overlap_groups(self._store, a, b, criterion, by) for a, b in keep]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def trajectories(self):
        """Stored trajectories: trajectory, method, n_steps, first, last, has_metrics."""
        from opdviz.store.across import trajectories

        return trajectories(self._store)

    def trajectory(self, name: str | None = None, metrics: str | Sequence[str] | None = None):
        """Trajectory metrics (tidy): trajectory, step, tensor, tower, layer, block, module, numel, metric,
        value, for ``name`` (default: every stored trajectory). The per-step runs ``NAME@STEP`` hold every
        per-pair metric too: ``metrics(runs=[...])``. Metric definitions: README "Trajectories"."""
        import pandas as pd

        from opdviz.store.across import trajectory_long

        known = list(self.trajectories()["trajectory"])
        names = [name] if name is not None else known
        if name is not None and name not in known:
            raise OptionsError(f"no trajectory {name!r} in {self.path} (trajectories: {', '.join(known) or 'none'})")
        frames = []
        for n in names:
            df = trajectory_long(self._store, n, metrics=tuple(_strs(metrics, "metrics")))
            df.insert(0, "trajectory", n)
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    # ------------------------------------------------------------------------------ figures
    def _build(self, name: str, runs, filters: dict):
        from opdviz.store import Selection
        from opdviz.views.context import AcrossContext, ViewContext
        from opdviz.views.registry import ACROSS_PAGES, figure_spec

        names = figure_names()
        if name not in names:
            raise OptionsError(f"no figure {name!r}; figures: {', '.join(names)}")
        unknown = sorted(set(filters) - set(self.FIGURE_FILTERS))
        if unknown:
            raise OptionsError(f"unknown figure filter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                               f"valid: runs, {', '.join(self.FIGURE_FILTERS)}")
        spec = figure_spec(name)
        table = self.runs()
        known = list(table["run_id"])
        chosen = _strs(runs, "runs")
        missing = [r for r in chosen if r not in known]
        if missing:
            raise OptionsError(f"no run named {', '.join(map(repr, missing))} in {self.path}; runs: "
                               f"{', '.join(known) or 'none'}")
        methods = _strs(filters.get("methods"), "methods")
        if methods:
            bad = [m for m in methods if m not in set(table["method"])]
            if bad:
                raise OptionsError(f"no run with method {', '.join(map(repr, bad))}; methods: "
                                   f"{', '.join(sorted(set(table['method'].dropna())))}")
            pool = chosen or list(table["run_id"])
            chosen = [r for r in pool if r in set(table.loc[table["method"].isin(methods), "run_id"])]
        elif not chosen and "kind" in table:
            # "all runs" hides trajectory steps, as the dashboard does (they have their own page)
            primary = list(table.loc[table["kind"] != "trajectory", "run_id"])
            chosen = primary if 0 < len(primary) < len(table) else []
        layers = _ints(filters.get("layers"), "layers")
        if layers and sorted(layers) != list(range(min(layers), max(layers) + 1)):
            raise OptionsError(f"figures take consecutive layers (a range), got {layers}")
        sel = Selection(runs=tuple(chosen), towers=tuple(_strs(filters.get("towers"), "towers")),
                        blocks=tuple(_strs(filters.get("blocks"), "blocks")),
                        modules=tuple(_strs(filters.get("modules"), "modules")),
                        layer_min=min(layers) if layers else None, layer_max=max(layers) if layers else None)
        criterion = filters.get("criterion") or AnalysisOptions().criterion
        if spec.page not in ACROSS_PAGES:
            ctx = ViewContext(criterion=criterion, tensor=filters.get("tensor"),
                              tensors=tuple(_strs(filters.get("tensors"), "tensors")),
                              metric=filters.get("metric") or "sparsity", run_a=filters.get("run_a"),
                              run_b=filters.get("run_b"))
        else:
            ctx = AcrossContext(criterion=criterion, run_a=filters.get("run_a"), run_b=filters.get("run_b"),
                                trajectory=filters.get("trajectory"), metric=filters.get("metric") or "sparsity")
        return spec.build(self._store, sel, ctx)


def _strs(value, what: str) -> list[str]:
    out = _as_list(value, what)
    if not all(isinstance(v, str) for v in out):
        raise OptionsError(f"{what} takes names (strings), got {value!r}")
    return out


def _ints(value, what: str) -> list[int]:
    out = [value] if isinstance(value, numbers.Integral) else _as_list(value, what)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in out):
        raise OptionsError(f"{what} takes integers (a layer index, a list or a range), got {value!r}")
    return [int(v) for v in out]


def _check_known(sel: dict, known: dict, path: Path) -> None:
    """Raise OptionsError for a selected value the store does not hold (a typo would silently select nothing)."""
    import fnmatch

    for key, values in sel.items():
        have = known[key]
        for v in values:
            if key == "metrics" and any(c in v for c in "*?["):
                ok = any(fnmatch.fnmatchcase(m, v) for m in have)
            else:
                ok = v in have
            if not ok:
                listing = ", ".join(str(h) for h in sorted(have, key=str)[:60]) or "none"
                more = f" … ({len(have)} in all)" if len(have) > 60 else ""
                raise OptionsError(f"no {key[:-1]} {v!r} in {path}; {key}: {listing}{more}")


def _as_list(value, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes, os.PathLike)):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise OptionsError(f"{what} takes one value or a list of them, got {value!r}") from None
