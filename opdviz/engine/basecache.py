"""The base cache: base factorizations kept beside the store, so a later job on the same base reuses them.

A job computes the base-only work of every tensor once for all its posts (``opdviz.engine.analyse.analyse_items``).
Of that work, the float64 Gram W_bᵀW_b and its eigen-decomposition are by far the costliest to
recompute for tall matrices (the Gram costs m·n² flops; a 151936×896 vocabulary matrix 122 GFLOP) and
cheap to keep (2n² + n floats). They are written, per tensor, to
``<db>.cache/base/<base fingerprint>/<tensor>.safetensors`` when the factors take no more bytes than
the base tensor itself (bf16: m ≥ 8n in working orientation: in practice the embedding and lm_head),
so the cache never grows beyond the base checkpoint. Cheaper base work (the elementwise prepass, square
and FFN matrices) is recomputed.

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


class BaseCache:
    """The cached base factors of one base checkpoint (``fingerprint``) under one store's cache folder."""

    def __init__(self, root: str | Path, fingerprint: str, opts: AnalysisOptions, device: torch.device | str):
        self.dir = Path(root) / fingerprint[:40]
        key = {"v": CACHE_VERSION, "spectrum": opts.spectrum, "exact_max_dim": opts.exact_max_dim,
               "approx_rank": opts.approx_rank, "seed": opts.seed, "device": torch.device(device).type}
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.hits = self.misses = self.writes = 0

    def _path(self, name: str) -> Path:
        return self.dir / f"{slug(name)}.{self.key}.safetensors"

    @staticmethod
    def worth_keeping(wb: torch.Tensor, factors: BaseFactors) -> bool:
        """Keep factors that take no more bytes than the base tensor (``wb``) itself."""
        return factors.nbytes() <= wb.numel() * wb.element_size()

    @staticmethod
    def could_keep(wb: torch.Tensor) -> bool:
        """Whether exact factors of this base view could be kept (2n² + n float64 ≤ its bytes)."""
        if wb.dim() != 2:
            return False
        n = min(wb.shape)
        return (2 * n * n + n) * 8 <= wb.numel() * wb.element_size()

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
                    self.misses += 1
                    return None
                # fresh (64-byte aligned) copies: MKL results can depend on the alignment in the last bits
                t = {k: f.get_tensor(k).clone() for k in f.keys()}
            factors = BaseFactors(meta["exact"] == "1", t["sig"], t["v"], gram=t.get("gram"), u=t.get("u"))
        except Exception:     # a corrupt or foreign file: recompute (and replace it on save)
            self.misses += 1
            return None
        self.hits += 1
        return factors

    def save(self, name: str, wb: torch.Tensor, factors: BaseFactors) -> bool:
        """Keep ``factors`` of base view ``wb`` when worth it; returns whether it was written. A failure to
        write (read-only folder, disk full) only means the next job recomputes."""
        if not self.worth_keeping(wb, factors):
            return False
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
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        self.writes += 1
        return True
