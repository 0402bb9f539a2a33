"""The base cache: base factorizations kept beside the store, so a later job on the same base reuses them.

A job computes the base-only work of every tensor once for all its posts (``opdviz.engine.analyse.analyse_items``).
Of that work, the float64 Gram W_bᵀW_b and its eigen-decomposition are the costliest to recompute
(the Gram costs m·n² flops, a 151936×896 vocabulary matrix 122 GFLOP; the eigh about 9n³) and cheap
to keep (2n² + n floats). They are written, per tensor, to
``<db>.cache/base/<base fingerprint>/<tensor>.safetensors`` within a budget: the base checkpoint's own
bytes, so the cache never grows beyond the base. The budget goes to the tallest matrices first (in
working orientation, m ≥ n: the saving per kept byte grows with m/n), group by group of one m/n, the
last group in part (``keep_plan``): for Qwen2.5-0.5B the embedding, lm_head, k/v and FFN matrices
(0.96 of 1.26 GB) and 22 of the 48 square q/o matrices; for Llama-2-7B the embedding, lm_head and 47
of the 96 FFN matrices.
Cheaper base work (the elementwise prepass) is recomputed.

Keys: the base checkpoint's fingerprint (a folder), the tensor (or fused part) name, and the options
and device type that change the factors (``CACHE_VERSION``, spectrum mode, approx rank, seed). The
fingerprint samples its files, so every entry also carries a sha256 of the tensor's own bytes, checked
before use: a different tensor under the same key is recomputed and its entry replaced, never used.
Entries are written to a temporary name and renamed, so a reader never sees half a file; a corrupt
entry is ignored. Results with the cache equal results without it bit for bit on the same device and
thread count (float64 BLAS sums depend on the thread count in the last bits).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch

from opdviz.metrics.linalg import BaseFactors
from opdviz.options import AnalysisOptions
from opdviz.store import slug

CACHE_VERSION = 1


def cache_root(db: str | Path) -> Path:
    """``<db>.cache/base``: the base cache of the store at ``db``."""
    return Path(str(db) + ".cache") / "base"


def _digest(t: torch.Tensor) -> str:
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(raw)).hexdigest()


def factor_bytes(shape) -> int:
    """Bytes of the exact factors of an m×n matrix: the n×n Gram and V in float64, and σ."""
    n = min(shape)
    return (2 * n * n + n) * 8


def keep_plan(shapes, budget: int) -> dict[float, int]:
    """Bytes of factors kept per shape ratio m/n (working orientation): the tallest matrices first, each
    group of one ratio whole while it fits, the first group that does not fit in part (its tensors in job
    order), none after it. ``shapes``: the 2-D base matrices; ``budget``: bytes for all of them."""
    groups: dict[float, list[int]] = {}
    for shape in shapes:
        if len(shape) == 2 and min(shape) > 0:
            groups.setdefault(max(shape) / min(shape), []).append(factor_bytes(shape))
    plan, left = {}, budget
    for r in sorted(groups, reverse=True):
        if left < min(groups[r]):          # not even one of this group fits
            break
        plan[r] = min(sum(groups[r]), left)
        left -= plan[r]
    return plan


class BaseCache:
    """The cached base factors of one base checkpoint (``fingerprint``) under one store's cache folder.

    ``shapes``: the shapes of the base checkpoint's tensors and ``budget`` its bytes: which matrices are
    kept (``keep_plan``), and a hard cap on the bytes of this base's entry files (counting those of
    earlier jobs). ``budget=None``: every matrix, no cap."""

    def __init__(self, root: str | Path, fingerprint: str, opts: AnalysisOptions, device: torch.device | str,
                 shapes=(), budget: int | None = None):
        self.dir = Path(root) / fingerprint[:40]
        key = {"v": CACHE_VERSION, "spectrum": opts.spectrum, "exact_max_dim": opts.exact_max_dim,
               "approx_rank": opts.approx_rank, "seed": opts.seed, "device": torch.device(device).type}
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.budget = budget
        # 1 % of the budget left for the files' headers, so the planned entries fit under the hard cap
        self.plan = keep_plan(shapes, int(budget * 0.99)) if budget is not None else None
        self.planned: dict[float, int] = {}        # factor bytes written this job, per ratio
        self.used = sum(p.stat().st_size for p in self.dir.glob(f"*.{self.key}.safetensors")) \
            if self.dir.is_dir() else 0
        self.hits = self.misses = self.writes = 0
        self._lock = threading.Lock()       # a job analyses several tensors at once (opdviz.engine.parallel)

    def _path(self, name: str) -> Path:
        return self.dir / f"{slug(name)}.{self.key}.safetensors"

    @staticmethod
    def _ratio(wb: torch.Tensor) -> float | None:
        return max(wb.shape) / min(wb.shape) if wb.dim() == 2 and min(wb.shape) > 0 else None

    def could_keep(self, wb: torch.Tensor) -> bool:
        """Whether the factors of this base view are of a kind kept (``keep_plan``: tall enough)."""
        r = self._ratio(wb)
        return r is not None and (self.plan is None or self.plan.get(r, 0) > 0)

    def load(self, name: str, wb: torch.Tensor) -> BaseFactors | None:
        """The cached factors of base view ``wb`` (named ``name``), on ``wb``'s device, or None."""
        path = self._path(name)
        if not self.could_keep(wb) or not path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device=str(wb.device)) as f:
                meta = f.metadata() or {}
                if meta.get("digest") != _digest(wb) or meta.get("name") != name:
                    self._count("misses")
                    return None
                # fresh (64-byte aligned) copies: MKL results can depend on the alignment in the last bits
                t = {k: f.get_tensor(k).clone() for k in f.keys()}
            factors = BaseFactors(meta["exact"] == "1", t["sig"], t["v"], gram=t.get("gram"), u=t.get("u"))
        except Exception:     # a corrupt or foreign file: recompute (and replace it on save)
            self._count("misses")
            return None
        self._count("hits")
        return factors

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def save(self, name: str, wb: torch.Tensor, factors: BaseFactors) -> bool:
        """Keep ``factors`` of base view ``wb`` when it is of the kind kept and within the budget; returns
        whether it was written. A failure to write (read-only folder, disk full) only means the next job
        recomputes."""
        with self._lock:
            return self._save(name, wb, factors)

    def _save(self, name: str, wb: torch.Tensor, factors: BaseFactors) -> bool:
        r = self._ratio(wb)
        if not self.could_keep(wb):
            return False
        fb = factor_bytes(wb.shape)
        if self.plan is not None and self.planned.get(r, 0) + fb > self.plan[r]:
            return False                    # this ratio's share of the budget is spent
        from safetensors.torch import save_file

        tensors = {"sig": factors.sig, "v": factors.v}
        if factors.gram is not None:
            tensors["gram"] = factors.gram
        if factors.u is not None:
            tensors["u"] = factors.u
        path = self._path(name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={"digest": _digest(wb), "name": name, "exact": "1" if factors.exact else "0"})
            size = tmp.stat().st_size
            if self.budget is not None and self.used + size > self.budget:
                tmp.unlink()
                return False
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        self.used += size
        self.planned[r] = self.planned.get(r, 0) + fb
        self.writes += 1
        return True
