"""One base tensor against its post-trained versions: the rows (tensors, metrics, arrays, failures) to store.

``analyse_items`` is the per-tensor work of every executor (``opdviz.engine.executors``): it splits fused
tensors into their parts, shares the base-only work (elementwise prepass, base factorization, coverage
reconstructions) across posts, records a failure on one unit with its stage and traceback, and turns the
results into store rows. ``resolve_device`` picks the torch device a job computes on.
"""

from __future__ import annotations

import time
import traceback
from typing import Callable

import torch

from opdviz.errors import OpdvizError, OptionsError
from opdviz.io.layouts import fused_parts, matrix_view, split_part
from opdviz.io.naming import parse_name
from opdviz.io.reader import PairItem
from opdviz.metrics.pair import add_coverage, analyse_pair, base_work, is_matrix_pair, timed
from opdviz.options import AnalysisOptions


def resolve_device(name: str) -> torch.device:
    """auto → cuda when available, else cpu; cuda without a GPU is an error that says what to do."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptionsError("--device cuda was asked for but torch sees no CUDA device "
                           f"(torch {torch.__version__}); use --device cpu or auto.")
    return torch.device(name)


def tensor_row(name: str, parent: str, part: str, parsed, shape, dtype: str, status: str, reason: str,
                seq: int, exact=None, seconds=None, expert=None, module=None) -> dict:
    rows = shape[0] if len(shape) >= 1 else None
    cols = int(torch.Size(shape[1:]).numel()) if len(shape) >= 2 else None
    numel = int(torch.Size(shape).numel())
    return {"tensor": name, "parent": parent, "part": part, "tower": parsed.tower, "layer": parsed.layer,
            "block": parsed.block, "module": module or parsed.module,
            "expert": parsed.expert if expert is None else expert, "param": parsed.param,
            "shape": list(shape), "rows": rows, "cols": cols, "numel": numel, "dtype": dtype, "status": status,
            "reason": reason, "spectrum_exact": exact, "seconds": seconds, "seq": seq}


def analyse_item(item: PairItem, wb: torch.Tensor, wp: torch.Tensor, opts: AnalysisOptions,
                 config: dict | None, seq: int) -> tuple[list, list, list, list]:
    """Rows (tensors, metrics, arrays, failures) for one stored tensor and its fused parts."""
    return analyse_items(wb, [(item, lambda: wp, seq)], opts, config)[0]


COVERAGE_BATCH_BYTES = 1 << 30    # packed masks (1 B/coordinate per post) held for a shared coverage pass


def analyse_items(wb: torch.Tensor, posts: list[tuple[PairItem, Callable[[], torch.Tensor], int]],
                  opts: AnalysisOptions, config: dict | None, stages: dict | None = None,
                  cache=None) -> list[tuple]:
    """Rows (tensors, metrics, arrays, failures) of one base tensor against each of several posts.

    ``posts``: (item, loader of the post tensor, seq) per post, all items naming the base tensor ``wb``.
    The base-only work (elementwise prepass, base factorization, principal-coverage reconstructions) is
    done once per unit (the tensor and its fused parts) and shared; each post tensor is loaded once,
    analysed, and dropped before the next. Results equal ``analyse_item`` of each pair alone.
    ``stages``: seconds by stage are added to it (read, elementwise, base_decomposition, ...).
    ``cache``: an ``opdviz.engine.basecache.BaseCache`` of this base: factors found there are used, costly
    ones computed here are kept there for later jobs.
    """
    item0 = posts[0][0]
    parsed = parse_name(item0.name)
    dtype = item0.base.dtype
    units: list[tuple[str, str, object]] = [("", "", None)]
    if opts.split_fused and wb.dim() >= 2:
        for part in fused_parts(item0.name, tuple(wb.shape), config):
            units.append((part.name(item0.name), part.suffix, part))

    def base_view(part):
        if part is None:
            # a 3-D stack of expert matrices is not one matrix: its parts get the spectra
            return matrix_view(item0.name, wb, config), tuple(wb.shape), wb.dim() == 2 or wb.dim() >= 4
        b = split_part(item0.name, wb, part, config)
        return b, tuple(b.shape), b.dim() == 2

    bases: dict[int, object] = {}                   # unit → BaseWork (None: base work failed)
    out: list[list] = [[None] * len(units) for _ in posts]   # [post][unit] → ("ok", res, s, shape) | failure
    pending: dict[int, list[int]] = {u: [] for u in range(len(units))}   # posts awaiting coverage

    def fail(pi: int, u: int, stage: str, exc: BaseException, seconds: float) -> None:
        name, suffix, part = units[u]
        message = str(exc) if isinstance(exc, OpdvizError) else traceback.format_exception(exc, limit=8)
        if isinstance(message, list):
            message = "".join(message)
        out[pi][u] = ("failed", {"tensor": name or item0.name, "stage": stage, "error": type(exc).__name__,
                                 "message": message},
                      f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", seconds)

    def flush(u: int) -> None:
        todo = pending[u]
        pending[u] = []
        if not todo:
            return
        t0 = time.perf_counter()
        try:
            b, _, _ = base_view(units[u][2])
            add_coverage(b, bases[u], [out[pi][u][1] for pi in todo], opts, stages)
        except Exception as exc:   # recorded for every post of the batch; the job goes on
            share = (time.perf_counter() - t0) / len(todo)
            for pi in todo:
                fail(pi, u, "metrics", exc, out[pi][u][2] + share)
            return
        share = (time.perf_counter() - t0) / len(todo)
        for pi in todo:
            kind, res, seconds, shape = out[pi][u]
            out[pi][u] = (kind, res, seconds + share, shape)

    for pi, (item, load, _) in enumerate(posts):
        t_read = time.perf_counter()
        wp = load()
        _add(stages, "read", time.perf_counter() - t_read)
        for u, (name, suffix, part) in enumerate(units):
            t0 = time.perf_counter()
            stage = "prepare"
            try:
                b, shape, is_matrix = base_view(part)
                p = matrix_view(item.name, wp, config) if part is None else split_part(item.name, wp, part, config)
                stage = "metrics"
                if u not in bases:
                    try:
                        bases[u] = _base_work(name or item0.name, b, opts, is_matrix, stages, cache)
                    except Exception:   # each post then computes alone and reports the error itself
                        bases[u] = None
                    # the base's time is shared by the posts of this job: charge it to the first
                if bases[u] is None:
                    res = analyse_pair(b, p, opts, matrix=is_matrix, stages=stages)
                else:
                    res = analyse_pair(b, p, opts, matrix=is_matrix, base=bases[u], coverage=False, stages=stages)
            except Exception as exc:  # recorded with stage and traceback; the job goes on
                fail(pi, u, stage, exc, time.perf_counter() - t0)
                continue
            out[pi][u] = ("ok", res, time.perf_counter() - t0, shape)
            if res.code is not None:
                pending[u].append(pi)
                if sum(out[i][u][1].code.numel() for i in pending[u]) >= COVERAGE_BATCH_BYTES:
                    flush(u)
        del wp
    for u in range(len(units)):
        flush(u)

    rows = []
    for pi, (item, _, seq) in enumerate(posts):
        tensors, metrics, arrays, failures = [], [], [], []
        for u, (name, suffix, part) in enumerate(units):
            key = name or item.name
            expert, module = (part.expert, part.module) if part else (None, None)
            entry = out[pi][u]
            if entry[0] == "failed":
                _, failure, reason, seconds = entry
                failures.append(failure)
                tensors.append(tensor_row(key, item.name if part else "", suffix, parsed,
                                           tuple(wb.shape) if part is None else (), dtype, "failed", reason, seq,
                                           seconds=seconds, expert=expert, module=module))
                continue
            _, res, seconds, shape = entry
            tensors.append(tensor_row(key, item.name if part else "", suffix, parsed, shape, dtype, "ok", "", seq,
                                       exact=res.exact, seconds=seconds, expert=expert, module=module))
            metrics.extend({"tensor": key, "metric": m, "value": float(v)} for m, v in res.scalars.items())
            for a, v in res.arrays.items():
                arrays.append({"tensor": key, "name": a, "shape": list(v.shape),
                               "values": v.astype("float64", copy=False).ravel().tolist()})
        rows.append((tensors, metrics, arrays, failures))
    return rows


def _base_work(name: str, b: torch.Tensor, opts: AnalysisOptions, is_matrix: bool, stages: dict | None, cache):
    """``base_work`` of one unit, through the base cache when there is one."""
    cached = None
    if cache is not None and is_matrix_pair(b, is_matrix):
        with timed(stages, "base_cache"):
            cached = cache.load(name, b)
    work = base_work(b, opts, matrix=is_matrix, stages=stages, factors=cached)
    if cache is not None and cached is None and work.factors is not None:
        with timed(stages, "base_cache"):
            cache.save(name, b, work.factors)
    return work


def _add(stages: dict | None, key: str, seconds: float) -> None:
    if stages is not None:
        stages[key] = stages.get(key, 0.0) + seconds
