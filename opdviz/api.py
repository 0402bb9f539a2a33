"""The Python face of opdviz: compute into a store, then read it as DataFrames and figures.

    import opdviz
    run = opdviz.analyze("base/", "opd/", db="data/opdviz.duckdb", name="qwen-opd", method="OPD")
    store = opdviz.open("data/opdviz.duckdb")          # read-only
    store.runs()                                       # one row per run
    store.metrics(runs=["qwen-opd"], modules=["q", "down"], metrics=["sparsity_abs_1e-5"])
    store.figure("sparsity.layerwise")                 # a plotly Figure (names: store.figure_names())

The ``opdviz`` commands are thin calls into these functions (``opdviz compute`` → ``analyze``,
``opdviz metrics`` → ``Results.metrics``), so a notebook, the CLI and the dashboard see the same rows.
Computing is resumable: calling ``analyze`` again with the same arguments finishes an interrupted run
and otherwise returns at once. Reading never writes: ``open`` refuses a missing or foreign file and returns
a ``Results`` (``opdviz.results``: runs, metrics, figures, overlap and trajectory tables).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from opdviz.errors import OptionsError
from opdviz.options import AnalysisOptions
from opdviz.results import Results, _as_list, figure_names

__all__ = ["analyze", "open", "overlap", "trajectory", "masks", "load_masks", "train_only_masked", "figure_names", "Results", "RunSummary",
           "OverlapSummary", "TrajectorySummary", "MasksSummary", "make_options", "DEFAULT_DB"]

DEFAULT_DB = "data/opdviz.duckdb"
PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------------------- summaries
@dataclass(frozen=True)
class RunSummary:
    """What ``analyze`` did for one post-trained checkpoint. ``wall_s``: seconds spent computing the run,
    summed over every (resumed) attempt; counts are stored tensors (skipped and failed included)."""

    run_id: str
    method: str
    status: str            # done | failed | interrupted
    n_tensors: int
    n_done: int
    n_skipped: int
    n_failed: int
    wall_s: float
    device: str
    db: Path
    error: str | None = None

    def __str__(self) -> str:
        return (f"{self.run_id}: {self.status} — {self.n_done} tensors ({self.n_skipped} skipped, "
                f"{self.n_failed} failed) in {self.wall_s:.1f} s → {self.db}")


@dataclass(frozen=True)
class OverlapSummary:
    """What ``overlap`` stored: mask-overlap counts of runs A and B for ``n_tensors`` tensors (``skipped``
    could not be compared), in ``wall_s`` seconds. Read the statistics with ``Results.overlap``."""

    run_a: str
    run_b: str
    n_tensors: int
    skipped: int
    wall_s: float
    db: Path


@dataclass(frozen=True)
class TrajectorySummary:
    """What ``trajectory`` stored: per-step runs ``NAME@STEP`` and trajectory metrics of ``n_tensors``
    tensors (``n_failed`` failed). ``wall_s``: seconds of the trajectory pass (the per-step runs excluded)."""

    name: str
    steps: tuple[int, ...]
    n_tensors: int
    n_failed: int
    wall_s: float
    db: Path


@dataclass(frozen=True)
class MasksSummary:
    """What ``masks`` wrote to ``out``: one mask per tensor, ``changed`` of ``numel`` entries changed."""

    out: Path
    criterion: str
    tensors: int
    numel: int
    changed: int
    skipped: int


# ----------------------------------------------------------------------------------------- options
def make_options(**options: Any) -> AnalysisOptions:
    """``AnalysisOptions`` from keyword arguments, checked up front: an unknown name or a value of the wrong
    type raises ``OptionsError`` that lists the valid options (lists are accepted where tuples are stored)."""
    fields = {f.name: f for f in dataclasses.fields(AnalysisOptions)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise OptionsError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; valid options: "
                           f"{', '.join(fields)} (see `opdviz compute --help` or the README's options table)")
    clean = {}
    for name, value in options.items():
        default = fields[name].default
        if isinstance(default, tuple):
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                value = (value,)
            value = tuple(value)
            elem = type(default[0]) if default else float
            if not all(_fits(v, elem) for v in value):
                raise OptionsError(f"option {name} takes {elem.__name__} values, got {value!r}")
        elif not _fits(value, type(default)):
            raise OptionsError(f"option {name} takes a {type(default).__name__}, got {value!r}")
        clean[name] = value
    return AnalysisOptions(**clean)


def _fits(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


# ----------------------------------------------------------------------------------------- computing
def analyze(base: PathLike, post: PathLike | Sequence[PathLike], *, db: PathLike = DEFAULT_DB,
            name: str | Sequence[str] | None = None, method: str | Sequence[str] = "post-trained",
            device: str = "auto", overwrite: bool = False, progress: bool = True, executor: Any = "local",
            **options: Any) -> RunSummary | list[RunSummary]:
    """Analyse post-trained checkpoint(s) against their base and store the results in ``db`` (resumable).

    Args:
        base: the base checkpoint: a ``.safetensors`` file or a Hugging Face folder (sharded or not).
        post: one post-trained checkpoint of that base, or a list of them.
        db: the DuckDB store to write (created if missing; results of other runs are kept).
        name: run name, or one per checkpoint (default: each checkpoint's file stem / folder name).
        method: method label (OPD, RL, SFT, DPO…), one for all or one per checkpoint.
        device: where the linear algebra runs: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        overwrite: replace stored runs of the same name instead of resuming them.
        progress: show a progress bar (tqdm, on stderr).
        executor: ``"local"`` (this process), ``"ray"`` (a local or ``$RAY_ADDRESS`` Ray cluster), or an
            executor object from ``opdviz.engine.executors``.
        **options: fields of ``opdviz.options.AnalysisOptions`` (e.g. ``spectrum="approx"``,
            ``abs_eps=[1e-6, 1e-5]``, ``include="layers\\.0\\."``); unknown names raise ``OptionsError``.

    Returns:
        A ``RunSummary`` for one checkpoint, a list of them (in order) for a list. A run that is already
        complete is not recomputed: calling again returns at once with its stored summary.

    Raises:
        OptionsError for inconsistent arguments (before any work starts), CheckpointError for unreadable
        checkpoints, StoreError when ``db`` cannot be written.
    """
    from opdviz.engine.executors import make_executor
    from opdviz.engine.runner import JobSpec, run_jobs

    opts = make_options(device=device, **options)
    many = not isinstance(post, (str, bytes, os.PathLike))
    posts = [Path(p) for p in _as_list(post, "post")]
    if not posts:
        raise OptionsError("no post-trained checkpoint given: pass a path or a list of paths as post")
    names = [str(n) for n in _as_list(name, "name")] or [_default_name(p) for p in posts]
    methods = [str(m) for m in _as_list(method, "method")] or ["post-trained"]
    if len(names) != len(posts):
        raise OptionsError(f"name has {len(names)} names for {len(posts)} post-trained checkpoints")
    if len(methods) == 1:
        methods = methods * len(posts)
    if len(methods) != len(posts):
        raise OptionsError(f"method has {len(methods)} labels for {len(posts)} post-trained checkpoints")
    if len(set(names)) != len(names):
        raise OptionsError(f"run names must differ: got {names}; pass one name per checkpoint")
    if isinstance(executor, str):
        executor = make_executor(executor)
    specs = [JobSpec(base=Path(base), post=p, run_id=n, method=m, db=Path(db), options=opts)
             for p, n, m in zip(posts, names, methods)]
    # one job for all runs: the local executor reads and decomposes each base tensor once for every post
    # (results equal each pair alone); ray: one pool for all runs
    rows = run_jobs(specs, progress=progress, overwrite=overwrite, executor=executor)
    out = [_run_summary(spec, row) for spec, row in zip(specs, rows)]
    return out if many else out[0]


def _run_summary(spec, row: dict) -> RunSummary:
    return RunSummary(run_id=spec.run_id, method=spec.method, status=str(row["status"]),
                      n_tensors=int(row["n_tensors"] or 0), n_done=int(row["n_done"] or 0),
                      n_skipped=int(row["n_skipped"] or 0), n_failed=int(row["n_failed"] or 0),
                      wall_s=float(row["wall_s"] or 0.0), device=str(row.get("device") or ""), db=Path(spec.db),
                      error=row.get("error") or None)


def _default_name(path: Path) -> str:
    path = path.resolve()
    return path.stem if path.is_file() else path.name


def overlap(base: PathLike, a: PathLike, b: PathLike, *, db: PathLike = DEFAULT_DB, run_a: str, run_b: str,
            method_a: str | None = None, method_b: str | None = None, base_b: PathLike | None = None,
            overwrite: bool = False, progress: bool = True, **options: Any) -> OverlapSummary:
    """Store the mask overlap of two runs that share ``base`` (every criterion, every tensor; resumable).

    Args:
        base: the shared base checkpoint; a, b: the post-trained checkpoints of runs A and B.
        db: the store; run_a, run_b: the runs' names (stored runs are checked to be these checkpoints;
            a run not in the store yet is registered with ``method_a`` / ``method_b``).
        base_b: B's base when stored elsewhere; it must be byte-identical to ``base``.
        overwrite: recompute every tensor of this pair. progress: show a progress bar.
        **options: ``AnalysisOptions`` fields (the thresholds decide which criteria are counted).

    Returns:
        An ``OverlapSummary``; the statistics (Jaccard, coverage, their independence baselines) are read
        with ``opdviz.open(db).overlap(run_a, run_b)``.
    """
    from opdviz.engine.overlap import OverlapSpec, run_overlap

    spec = OverlapSpec(base=Path(base), a=Path(a), b=Path(b), run_a=run_a, run_b=run_b, db=Path(db),
                       options=make_options(**options), base_b=Path(base_b) if base_b else None,
                       method_a=method_a, method_b=method_b)
    res = run_overlap(spec, progress=progress, overwrite=overwrite)
    return OverlapSummary(run_a=run_a, run_b=run_b, n_tensors=int(res["n_tensors"]), skipped=int(res["skipped"]),
                          wall_s=float(res["wall_s"]), db=Path(db))


def trajectory(base: PathLike, steps: PathLike | Sequence[PathLike] | dict[int, PathLike] | Sequence[tuple[int, PathLike]],
               *, db: PathLike = DEFAULT_DB, name: str, method: str, k: int = 16, hill_frac: float = 0.10,
               overwrite: bool = False, progress: bool = True, **options: Any) -> TrajectorySummary:
    """Analyse the checkpoints of one training run step by step against ``base`` (resumable).

    Args:
        base: the base checkpoint.
        steps: a folder of step-tagged checkpoints (``checkpoint-100/`` …), a list of checkpoints whose
            names carry the step, a dict ``{step: path}``, or a list of ``(step, path)``.
        db: the store; name: the trajectory's name (the per-step runs are ``NAME@STEP``); method: its label.
        k: K of the subspace similarity Sim_K. hill_frac: share of eigenvalues in the Hill tail estimate.
        overwrite: replace stored results of this trajectory. progress: show progress bars.
        **options: ``AnalysisOptions`` fields.

    Returns:
        A ``TrajectorySummary``; read the metrics with ``opdviz.open(db).trajectory(name)``.
    """
    from opdviz.engine.trajectory import TrajectorySpec, find_checkpoints, run_trajectory

    if isinstance(steps, dict):
        paths, numbers = [Path(p) for p in steps.values()], [int(s) for s in steps]
    elif not isinstance(steps, (str, bytes, os.PathLike)) and steps and all(isinstance(s, tuple) for s in steps):
        paths, numbers = [Path(p) for _, p in steps], [int(s) for s, _ in steps]
    else:
        paths, numbers = [Path(p) for p in _as_list(steps, "steps")], None
    cks = find_checkpoints(paths, numbers)
    spec = TrajectorySpec(base=Path(base), checkpoints=cks, name=name, method=method, db=Path(db),
                          options=make_options(**options), k=k, hill_frac=hill_frac)
    res = run_trajectory(spec, progress=progress, overwrite=overwrite)
    return TrajectorySummary(name=name, steps=tuple(int(s) for s in res["steps"]), n_tensors=int(res["n_tensors"]),
                             n_failed=int(res["n_failed"]), wall_s=float(res["wall_s"]), db=Path(db))


def masks(base: PathLike, post: PathLike, *, out: PathLike, criterion: str = "abs_1e-5", packed: bool = False,
          allow_pickle: bool = False) -> MasksSummary:
    """Write the changed mask of every tensor of ``post`` vs ``base`` to ``out`` (safetensors).

    Args:
        criterion: what counts as changed: ``exact``, ``abs_<ε>``, ``relrms_<τ>`` or ``bf16_<η>``.
        packed: bit-packed uint8 masks (8× smaller; shapes in the metadata).
        allow_pickle: allow ``.bin``/``.pt`` checkpoints (loaded with ``torch.load(weights_only=True)``).

    Returns:
        A ``MasksSummary``. Read the file back with ``opdviz.load_masks`` and train only the masked
        coordinates with ``opdviz.train_only_masked``.
    """
    from opdviz.engine.masks import write_masks

    res = write_masks(base, post, out, criterion, packed=packed, allow_pickle=allow_pickle)
    return MasksSummary(out=Path(out), criterion=criterion, tensors=int(res["tensors"]), numel=int(res["numel"]),
                        changed=int(res["changed"]), skipped=int(res["skipped"]))


def load_masks(path: PathLike, device: str = "cpu") -> dict:
    """Read a mask file written by ``masks`` (bool or packed) → {tensor name: bool tensor of its shape}."""
    from opdviz.engine.masks import load_masks as load

    return load(path, device)


def train_only_masked(model: "torch.nn.Module", masks: dict, optimizer: "torch.optim.Optimizer | None" = None) -> Any:
    """Make ``model`` train only the True coordinates of ``masks`` (name → bool tensor; other parameters are
    frozen): gradients are masked and, with ``optimizer``, frozen coordinates are restored after every step
    (AdamW's decoupled weight decay would move them). Returns a handle; ``handle.remove()`` undoes it."""
    from opdviz.engine.masks import train_only_masked as train

    return train(model, masks, optimizer)


# ----------------------------------------------------------------------------------------- reading
def open(db: PathLike = DEFAULT_DB) -> Results:  # noqa: A001 — the name is the contract (like duckdb.connect)
    """Open a store for reading. Never creates or changes a file.

    Raises:
        StoreError when ``db`` does not exist (and no job has staged results for it yet), is a folder,
        is not a DuckDB file, or is a DuckDB file without opdviz's tables.
    """
    from opdviz.store import Store

    store = Store(db)
    store.check_readable()
    return Results(store)
