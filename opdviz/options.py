"""Analysis options: one frozen object, built at the edge (CLI flags, page form), passed down.

Each field carries its help text in ``metadata``; ``opdviz.cli`` generates the ``compute`` flags from
these fields, and a test checks that every option is documented in the README.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import OptionsError


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class AnalysisOptions:
    """What to compute for every tensor pair, and how."""

    device: str = _opt("auto", "Where heavy linear algebra runs: auto (cuda when available), cpu, cuda.",
                       choices=("auto", "cpu", "cuda"))
    spectrum: str = _opt("auto", "Singular spectra: exact, approx (randomized top-k, flagged), or auto "
                         "(exact, except on CPU for matrices whose smaller side exceeds --exact-max-dim).",
                         choices=("auto", "exact", "approx"))
    exact_max_dim: int = _opt(4096, "With --spectrum auto on CPU: largest min(m, n) still decomposed exactly.")
    approx_rank: int = _opt(256, "Number of singular values/vectors kept by the randomized solver (approx spectra).")
    abs_eps: tuple[float, ...] = _opt((1e-8, 1e-7, 1e-6, 1e-5, 1e-4),
                                      "Absolute thresholds ε: a coordinate changed when |ΔW| > ε.")
    relrms_tau: tuple[float, ...] = _opt((1e-4, 1e-3, 1e-2),
                                         "Relative thresholds τ: changed when |ΔW| > τ·RMS(W_base).")
    bf16_eta: tuple[float, ...] = _opt((1e-3,),
                                       "bf16-aware thresholds η: changed when |ΔW| > η·max(|W_base|, |W_post|).")
    criterion: str = _opt("abs_1e-5", "Default 'changed' criterion (masks, coverage, maps, decile profile).")
    proj_fracs: tuple[float, ...] = _opt((0.01, 0.05, 0.10, 0.20),
                                         "Rank fractions r for principal projection (k = floor(r·min(m, n))).")
    angle_ks: tuple[int, ...] = _opt((16, 64, 512), "Subspace sizes k for principal angles (capped by min(m, n)).")
    coverage_alphas: tuple[float, ...] = _opt((0.01, 0.05, 0.10, 0.20, 0.30, 0.50),
                                              "Fractions α for low-magnitude and principal coverage.")
    coverage_fixed_rank: int = _opt(64, "Fixed reconstruction rank for the second principal-coverage convention.")
    map_size: int = _opt(128, "Largest side of the downsampled sparsity map, in blocks.")
    split_fused: bool = _opt(True, "Also analyse fused tensors (qkv, gate_up, c_attn…) as their parts.")
    allow_pickle: bool = _opt(False, "Allow .bin/.pt checkpoints, loaded with torch.load(weights_only=True).")
    include: str = _opt("", "Only tensors whose name matches this regular expression.")
    exclude: str = _opt("", "Skip tensors whose name matches this regular expression.")
    chunk_elems: int = _opt(1 << 22, "Elements per chunk in elementwise passes (bounds temporary memory).")
    seed: int = _opt(0, "Seed for randomized solvers, so reruns give identical results.")
    base_cache: bool = _opt(True, "Keep costly base factorizations beside the store (<db>.cache/base/) and reuse "
                            "them in later jobs on the same base.")

    def __post_init__(self) -> None:
        for name in ("abs_eps", "relrms_tau", "bf16_eta", "proj_fracs", "coverage_alphas", "angle_ks"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.device not in ("auto", "cpu", "cuda"):
            raise OptionsError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.spectrum not in ("auto", "exact", "approx"):
            raise OptionsError(f"spectrum must be auto, exact or approx, not {self.spectrum!r}")
        for a in self.coverage_alphas + self.proj_fracs:
            if not 0 < a <= 1:
                raise OptionsError(f"fractions must lie in (0, 1], got {a}")
        if any(k < 1 for k in self.angle_ks) or self.approx_rank < 1 or self.map_size < 1:
            raise OptionsError("angle_ks, approx_rank and map_size must be positive")
        if self.criterion not in self.criteria():
            raise OptionsError(f"criterion {self.criterion!r} is not one of the computed criteria: "
                               f"{', '.join(self.criteria())}")

    def criteria(self) -> tuple[str, ...]:
        """Names of every 'changed' criterion computed, e.g. ('exact', 'abs_1e-5', 'relrms_1e-3', 'bf16_1e-3')."""
        return (("exact",) + tuple(f"abs_{fmt_num(e)}" for e in self.abs_eps)
                + tuple(f"relrms_{fmt_num(t)}" for t in self.relrms_tau)
                + tuple(f"bf16_{fmt_num(h)}" for h in self.bf16_eta))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AnalysisOptions":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known})

    def result_key(self) -> str:
        """The options that change stored numbers (not device/chunking/caching); resuming requires them equal."""
        d = dataclasses.asdict(self)
        for k in ("device", "chunk_elems", "base_cache"):
            d.pop(k)
        return json.dumps(d, sort_keys=True)


def fmt_num(x: float) -> str:
    """Short stable spelling of a threshold or fraction for metric names: 1e-05 -> '1e-5', 0.001 -> '1e-3'."""
    m, e = f"{x:.6e}".split("e")
    m = m.rstrip("0").rstrip(".")
    return f"{m}e{int(e)}"


def fmt_pct(frac: float) -> str:
    """A fraction as a percent label for metric names: 0.1 -> '10pct', 0.001 -> '0.1pct'."""
    p = round(frac * 100, 6)
    return (f"{p:g}" if p != int(p) else str(int(p))) + "pct"
