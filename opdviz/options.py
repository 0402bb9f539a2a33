"""Analysis options: one frozen object, built at the edge (CLI flags, page form), passed down.

Each field carries its help text in ``metadata``; ``opdviz.cli`` generates the ``compute`` flags from
these fields, and a test checks that every option is documented in the README.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field

from opdviz.errors import OptionsError

MAX_PATTERN_CHARS = 1000      # --include/--exclude: longer patterns are refused
MAX_LABEL_CHARS = 200         # run names and method labels
MAX_MAP_SIZE = 4096           # --map-size: a map is stored per tensor, map_size² values at most


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
        """Every value is checked here, before any work: numbers (NaN, infinities, ranges), patterns."""
        for name in ("abs_eps", "relrms_tau", "bf16_eta", "proj_fracs", "coverage_alphas", "angle_ks"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                value = (value,)        # a single value where a list is expected: checked below
            if not isinstance(value, tuple):
                value = tuple(value)
            object.__setattr__(self, name, value)
        if self.device not in ("auto", "cpu", "cuda"):
            raise OptionsError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.spectrum not in ("auto", "exact", "approx"):
            raise OptionsError(f"spectrum must be auto, exact or approx, not {self.spectrum!r}")
        for name in ("abs_eps", "relrms_tau", "bf16_eta"):
            _check_numbers(name, getattr(self, name), "a finite number > 0", lambda x: x > 0)
        for name in ("coverage_alphas", "proj_fracs"):
            _check_numbers(name, getattr(self, name), "a fraction in (0, 1]", lambda x: 0 < x <= 1)
        _check_numbers("angle_ks", self.angle_ks, "an integer ≥ 1", lambda x: x >= 1, integer=True)
        for name, low, high in (("exact_max_dim", 0, None), ("approx_rank", 1, None), ("coverage_fixed_rank", 1, None),
                                ("map_size", 1, MAX_MAP_SIZE), ("chunk_elems", 1, None), ("seed", 0, 2**63 - 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
                span = f"between {low} and {high}" if high is not None else f"≥ {low}"
                raise OptionsError(f"--{_flag(name)} must be an integer {span}, got {v!r}")
        for name in ("split_fused", "allow_pickle"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"--{_flag(name)} must be true or false, got {getattr(self, name)!r}")
        for name in ("include", "exclude"):
            check_pattern(getattr(self, name), f"--{name}")
        for name in ("abs_eps", "relrms_tau", "bf16_eta", "proj_fracs", "coverage_alphas", "angle_ks"):
            spelled = [fmt_num(x) for x in getattr(self, name)]
            dup = next((x for x, sx in zip(getattr(self, name), spelled) if spelled.count(sx) > 1), None)
            if dup is not None:     # equal names would collide in the store (abs_1e-5 twice)
                raise OptionsError(f"--{_flag(name)} lists {dup} twice (values must differ)")
        if not isinstance(self.criterion, str) or self.criterion not in self.criteria():
            raise OptionsError(f"criterion {self.criterion!r} is not one of the computed criteria: "
                               f"{', '.join(self.criteria())}")

    def criteria(self) -> tuple[str, ...]:
        """Names of every 'changed' criterion computed, e.g. ('exact', 'abs_1e-5', 'relrms_1e-3', 'bf16_1e-3')."""
        return tuple(name for name, _kind, _value in self.thresholds())

    def thresholds(self) -> tuple[tuple[str, str, float], ...]:
        """Every 'changed' criterion as (name, kind, threshold), in ``criteria()`` order; "exact" has none (0)."""
        return ((("exact", "exact", 0.0),)
                + tuple((criterion_name(k, x), k, x) for k, values in
                        (("abs", self.abs_eps), ("relrms", self.relrms_tau), ("bf16", self.bf16_eta)) for x in values))

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


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_numbers(name: str, values: tuple, what: str, ok, integer: bool = False) -> None:
    for x in values:
        number = isinstance(x, int) if integer else isinstance(x, (int, float))
        if isinstance(x, bool) or not number or not math.isfinite(x) or not ok(x):
            raise OptionsError(f"--{_flag(name)}: each value must be {what}, got {x!r}")


def check_pattern(pattern, what: str = "pattern") -> re.Pattern | None:
    """Compile a user's regular expression up front (None for ""), refusing long or broken ones.

    Raises:
        OptionsError: not a string, over ``MAX_PATTERN_CHARS``, control characters, or not a valid regex.
    """
    if not isinstance(pattern, str):
        raise OptionsError(f"{what} must be a regular expression (text), got {pattern!r}")
    if not pattern:
        return None
    if len(pattern) > MAX_PATTERN_CHARS:
        raise OptionsError(f"{what} is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are allowed")
    if any(unicodedata.category(c) == "Cc" for c in pattern):
        raise OptionsError(f"{what} {pattern!r} contains control characters; write them as escapes (\\t, \\n)")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise OptionsError(f"{what} {pattern!r} is not a valid regular expression: {exc}; "
                           "e.g. 'mlp|self_attn' or '^model\\.layers\\.(0|1)\\.'") from None


def check_label(value, what: str = "run name", max_chars: int = MAX_LABEL_CHARS) -> str:
    """A run name or method label as given, once known to be safe to store and show.

    Refused: not a string, empty or only whitespace, leading/trailing whitespace, longer than
    ``MAX_LABEL_CHARS``, control characters, line/paragraph separators and bidirectional overrides
    (which would make a name display as something else).

    Raises:
        OptionsError: saying what is wrong with the value.
    """
    if not isinstance(value, str):
        raise OptionsError(f"{what} must be text, got {value!r}")
    if not value.strip():
        raise OptionsError(f"{what} {value!r} is empty or only whitespace; give a name")
    bad = [c for c in value if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")]
    if bad:
        raise OptionsError(f"{what} {value!r} contains control or invisible characters "
                           f"({', '.join(f'U+{ord(c):04X}' for c in dict.fromkeys(bad))}); use printable text")
    if value != value.strip():
        raise OptionsError(f"{what} {value!r} starts or ends with whitespace; remove it")
    if len(value) > max_chars:
        raise OptionsError(f"{what} is {len(value)} characters long; at most {max_chars} are allowed")
    return value


def finite_number(minimum: float = 0.0):
    """An argparse ``type``: a finite float ≥ ``minimum`` (NaN and infinities refused with a clear message)."""
    import argparse

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a finite number ≥ {minimum:g}, got {text!r}")
        return value

    return parse


def fmt_num(x: float) -> str:
    """Short stable spelling of a threshold or fraction for metric names: 1e-05 -> '1e-5', 0.001 -> '1e-3'."""
    m, e = f"{x:.6e}".split("e")
    m = m.rstrip("0").rstrip(".")
    return f"{m}e{int(e)}"


def fmt_pct(frac: float) -> str:
    """A fraction as a percent label for metric names: 0.1 -> '10pct', 0.001 -> '0.1pct'."""
    p = round(frac * 100, 6)
    return (f"{p:g}" if p != int(p) else str(int(p))) + "pct"


# ------------------------------------------------------------------------------ "changed" criteria
# The one vocabulary of criteria: names (``criterion_name``), their order, and how each reads in a label.
# Every list of criteria in the package and the pages derives from here (tests/test_options.py checks).

CRITERION_KINDS = ("exact", "abs", "relrms", "bf16")      # the order every list of criteria follows
# kind → how one criterion reads, "{v}" its threshold: the short form (axis titles), the long form (pickers),
# and the "unchanged" form (the lab's figures count unchanged coordinates)
CRITERION_TEXT = {
    "exact": {"short": "bitwise", "long": "exact: any stored bit changed", "unchanged": "bf16-exact (bits equal)"},
    "abs": {"short": "|ΔW| > {v}", "long": "|ΔW| > {v}", "unchanged": "|ΔW| ≤ {v}"},
    "relrms": {"short": "|ΔW| > {v}·RMS(W)", "long": "|ΔW| > {v}·RMS(W_base)", "unchanged": "|ΔW| ≤ {v}·RMS(W)"},
    "bf16": {"short": "|ΔW| > {v}·max|W|", "long": "bf16-η: |ΔW| > {v}·max(|W_base|, |W_post|)",
             "unchanged": "|ΔW| ≤ {v}·max|W|"},
}


def criterion_name(kind: str, value: float = 0.0) -> str:
    """The stored name of a criterion: ``exact``, or kind and threshold (``abs``, 1e-05 → ``abs_1e-5``)."""
    return kind if kind == "exact" else f"{kind}_{fmt_num(value)}"


def criterion_label(name: str, style: str = "short") -> str:
    """How a stored criterion name reads (``abs_1e-5`` → ``|ΔW| > 1e-5``), in one of ``CRITERION_TEXT``'s
    styles: "short", "long" or "unchanged". An unknown name is returned as is."""
    kind, _, value = name.partition("_")
    text = CRITERION_TEXT.get(kind)
    return text[style].format(v=value) if text else name


def criterion_sort_key(name: str) -> tuple[int, float]:
    """Sort key of a criterion name: by kind (``CRITERION_KINDS``), then by threshold."""
    kind, _, value = name.partition("_")
    rank = CRITERION_KINDS.index(kind) if kind in CRITERION_KINDS else len(CRITERION_KINDS)
    return rank, float(value or 0)


# the "changed" criteria stored by default, in the order pages and exports list them (the one list:
# figure exports, views and the sidebar read it from here)
DEFAULT_CRITERIA: tuple[str, ...] = AnalysisOptions().criteria()
DEFAULT_CRITERION: str = AnalysisOptions().criterion
# the subset the lab sweep's figures and tables show (opdviz.views.lab, opdviz.store.lab.lab_runs)
LAB_CRITERIA: tuple[str, ...] = tuple(c for c in DEFAULT_CRITERIA
                                      if c in ("exact", "abs_1e-6", "abs_1e-5", "abs_1e-4", "bf16_1e-3"))
