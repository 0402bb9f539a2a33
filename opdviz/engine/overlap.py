"""Mask overlap between two runs that share a base: which coordinates both A and B changed.

For every tensor and every criterion of ``AnalysisOptions.criteria()`` the job stores the counts
|A|, |B|, |A∩B| and numel in the ``overlap`` table; Jaccard, one-sided coverage and their
independence baselines are derived from the counts at read time (``opdviz.views.across.overlap_stats``),
so group aggregates are numel-weighted by construction (sums of counts).

The runs must share a base. The base given here is fingerprinted and compared with the runs'
stored base fingerprints, and every distinct base file involved (``--base``, ``--base-b``, and the
stored base paths of runs A and B when they still exist) is streamed alongside and compared
byte for byte, tensor by tensor; any difference stops the job with an error.

    opdviz overlap --db data/opdviz.duckdb --base BASE --a POST_A --b POST_B --run-a opd --run-b rl

Resumable like ``opdviz compute``: a tensor whose rows are stored is not recomputed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from opdviz.io.adapters import open_post
from opdviz.errors import CheckpointError, OptionsError
from opdviz.engine.progress import run_lock
from opdviz.engine.provenance import package_versions
from opdviz.engine.masks import changed_chunks
from opdviz.engine.runner import name_filter, run_keyed
from opdviz.io.naming import parse_name
from opdviz.options import AnalysisOptions, check_label
from opdviz.io.reader import Checkpoint, PairItem, plan_pairs
from opdviz.store import dumps, now, RunWriter, Store
from opdviz.store.progress import overlap_criteria, overlap_done


@dataclass(frozen=True)
class OverlapSpec:
    """One overlap computation: a base, two post-trained checkpoints and the runs they belong to."""

    base: Path
    a: Path
    b: Path
    run_a: str
    run_b: str
    db: Path
    options: AnalysisOptions = AnalysisOptions()
    base_b: Path | None = None          # the base B was trained from, when stored separately
    method_a: str | None = None         # needed when run_a is not in the store yet
    method_b: str | None = None

    def __post_init__(self) -> None:
        check_label(self.run_a, "--run-a")
        check_label(self.run_b, "--run-b")
        for value, what in ((self.method_a, "--method-a"), (self.method_b, "--method-b")):
            if value is not None:
                check_label(value, what)

    @property
    def pair_id(self) -> str:
        return f"overlap:{self.run_a}|{self.run_b}"


def overlap_counts(wb: torch.Tensor, wa: torch.Tensor, wbb: torch.Tensor, criteria: tuple[str, ...],
                   chunk: int = 1 << 24) -> dict[str, tuple[int, int, int]]:
    """Per criterion: (|A|, |B|, |A∩B|), A = changed(base → wa), B = changed(base → wbb).

    ``wb``, ``wa``, ``wbb``: same shape and dtype. Chunked: temporary memory is a few chunks."""
    counts = {c: [0, 0, 0] for c in criteria}
    for (_, ma), (_, mb) in zip(changed_chunks(wb, wa, criteria, chunk), changed_chunks(wb, wbb, criteria, chunk)):
        for c in criteria:
            a, b = ma[c], mb[c]
            k = counts[c]
            k[0] += int(torch.count_nonzero(a))
            k[1] += int(torch.count_nonzero(b))
            k[2] += int(torch.count_nonzero(a & b))
    return {c: (k[0], k[1], k[2]) for c, k in counts.items()}


def _bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    return bool(torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)))


def _check_run(store: Store, run_id: str, method: str | None, post_fp: str, base_fp: str, which: str) -> dict | None:
    row = store.run_row(run_id)
    if row is None:
        if not method:
            raise OptionsError(f"run {run_id!r} (--run-{which}) is not in {store.db_path}; compute it first with "
                               f"`opdviz compute`, or pass --method-{which} LABEL to register it for the overlap only")
        return None
    if row.get("post_fingerprint") and row["post_fingerprint"] != post_fp:
        raise OptionsError(f"run {run_id!r} in the store was computed from {row.get('post_path')}, whose content "
                           f"differs from --{which}; pass the checkpoint of that run, or another --run-{which} name")
    if row.get("base_fingerprint") and row["base_fingerprint"] != base_fp:
        raise CheckpointError(f"run {run_id!r} was computed against the base {row.get('base_path')}, which differs "
                              "from --base (fingerprints differ): overlaps are only defined between runs that "
                              "share a base")
    return row


def _register_run(writer: RunWriter, spec: OverlapSpec, post: Path, method: str, base_fp: str, post_fp: str,
                  base: Checkpoint, post_ck: Checkpoint) -> None:
    """A runs row for a run known only through an overlap (kind "reference": no per-tensor results)."""
    t = now()
    writer.write_run({
        "method": method, "kind": "reference", "base_path": str(Path(spec.base).resolve()),
        "post_path": str(Path(post).resolve()), "base_fingerprint": base_fp, "post_fingerprint": post_fp,
        "base_bytes": base.total_bytes, "post_bytes": post_ck.total_bytes, "options": spec.options.to_json(),
        "versions": dumps(package_versions()), "status": "done", "created_at": t, "finished_at": t,
        "n_tensors": 0, "n_done": 0, "n_skipped": 0, "n_failed": 0, "extra": dumps({"registered_by": "overlap"})})


def run_overlap(spec: OverlapSpec, *, progress: bool = True, overwrite: bool = False, log=print) -> dict:
    """Compute (or resume) the overlap of runs A and B. Returns {"pair", "n_tensors", "n_done", "wall_s",
    "skipped"}. Raises CheckpointError when the bases differ, OptionsError on inconsistent arguments."""
    opts = spec.options
    if spec.run_a == spec.run_b:
        raise OptionsError("--run-a and --run-b must name two different runs")
    criteria = opts.criteria()
    store = Store(spec.db)
    store.check()          # before any work: a foreign or broken --db is refused untouched
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(Checkpoint.open(spec.base, allow_pickle=opts.allow_pickle))
        ca = stack.enter_context(open_post(spec.a, base, allow_pickle=opts.allow_pickle))
        cb = stack.enter_context(open_post(spec.b, base, allow_pickle=opts.allow_pickle))
        base_fp = base.fingerprint()
        fp_a, fp_b = ca.fingerprint(), cb.fingerprint()
        row_a = _check_run(store, spec.run_a, spec.method_a, fp_a, base_fp, "a")
        row_b = _check_run(store, spec.run_b, spec.method_b, fp_b, base_fp, "b")

        # every other base file involved must be the same checkpoint: fingerprint now, bytes while streaming
        others: list[Checkpoint] = []
        seen = {Path(base.path).resolve()}
        candidates = [spec.base_b] + [Path(r["base_path"]) for r in (row_a, row_b) if r and r.get("base_path")]
        for path in candidates:
            if path is None or Path(path).resolve() in seen or not Path(path).exists():
                continue
            seen.add(Path(path).resolve())
            other = stack.enter_context(Checkpoint.open(path, allow_pickle=opts.allow_pickle))
            if other.fingerprint() != base_fp:
                raise CheckpointError(f"the bases differ: {path} and {spec.base} are different checkpoints "
                                      "(fingerprints differ); overlaps are only defined between runs that share a base")
            others.append(other)

        plan_a = {i.name: i for i in plan_pairs(base, ca)}
        plan_b = {i.name: i for i in plan_pairs(base, cb)}
        items: list[tuple[PairItem, PairItem]] = []
        skipped: list[tuple[str, str]] = []
        for name, ia in plan_a.items():
            if ia.base is None:
                continue
            ib = plan_b.get(name)
            if ia.status != "ok" or ib is None or ib.status != "ok":
                skipped.append((name, ia.reason or (ib.reason if ib is not None else "missing in B")))
            else:
                items.append((ia, ib))
        keep = name_filter(opts)
        items = [(ia, ib) for ia, ib in items if keep(ia.name)]
        if not items:
            raise OptionsError(f"no tensor of {spec.base} can be compared in both {spec.a} and {spec.b}")

        with run_lock(store, spec.pair_id):
            stored = overlap_criteria(store, spec.run_a, spec.run_b)
            if stored and stored != set(criteria) and not overwrite:
                raise OptionsError(f"the overlap of {spec.run_a!r} and {spec.run_b!r} is stored with other criteria "
                                   f"({sorted(stored)}); pass the same threshold options, or --overwrite")
            # --overwrite recomputes every tensor; its new rows replace the old ones key by key
            done = set() if overwrite else overlap_done(store, spec.run_a, spec.run_b)
            for run_id, row, path, method, fp, ck in ((spec.run_a, row_a, spec.a, spec.method_a, fp_a, ca),
                                                       (spec.run_b, row_b, spec.b, spec.method_b, fp_b, cb)):
                if row is None:
                    _register_run(RunWriter(store, run_id), spec, path, method, base_fp, fp, base, ck)
            pairs = {ia.name: (ia, ib) for ia, ib in items}

            def compute(name: str) -> list[dict]:
                ia, ib = pairs[name]
                wb = base.load(ia.base.name)
                for other in others:
                    if ia.base.name not in other.infos or not _bits_equal(wb, other.load(ia.base.name)):
                        raise CheckpointError(f"the bases differ at tensor {ia.base.name!r}: {other.path} and "
                                              f"{spec.base} hold different values; overlaps are only defined "
                                              "between runs that share a base")
                wa, wbb = ca.load(ia.post.name), cb.load(ib.post.name)
                counts = overlap_counts(wb, wa, wbb, criteria, opts.chunk_elems)
                del wb, wa, wbb
                p = parse_name(ia.name)
                return [{"run_a": spec.run_a, "run_b": spec.run_b, "tensor": ia.name, "tower": p.tower,
                         "layer": p.layer, "block": p.block, "module": p.module, "criterion": c,
                         "numel": ia.base.numel, "n_a": n_a, "n_b": n_b, "n_ab": n_ab}
                        for c, (n_a, n_b, n_ab) in counts.items()]

            # bytes read per tensor: the base (and every other copy of it), A's and B's tensors
            units = [(ia.name, ia.base.nbytes * (1 + len(others)) + ia.post.nbytes + ib.post.nbytes)
                     for ia, ib in items]
            wall = run_keyed(
                store, spec.pair_id, "overlap", units, done, compute, progress=progress, log=log,
                resume_note=f"resuming the overlap {spec.run_a} ∩ {spec.run_b}: {len(done)} of {len(items)} "
                            "tensors stored",
                busy_note=f"note: {spec.db} was busy; the overlap stays readable in {store.staging} and is folded "
                          "later by any job or `opdviz fold`.")
    for name, reason in skipped:
        log(f"skipped {name}: {reason}")
    return {"pair": spec.pair_id, "n_tensors": len(items), "n_done": len(items), "wall_s": wall,
            "skipped": len(skipped)}

