"""Checking checkpoints chosen in the browser before a job is queued: reports, never exceptions.

``validate_checkpoint`` / ``validate_pair`` open the checkpoints with ``opdviz.io.reader`` (headers, dtypes,
shapes, offsets, index consistency, refusal of pickles; a PEFT adapter through ``opdviz.io.adapters``)
and never raise on bad input: they return reports whose ``errors`` say what is wrong and what to do, and
whose ``warnings`` list what will be skipped.

    report = validate_pair(checkpoint_in(folder), resolve_under_roots("data/demo/base"))

This module does not import torch at import time; validation does (through ``opdviz.io.reader``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from opdviz.errors import CheckpointError


@dataclass
class ValidationReport:
    """What ``validate_checkpoint`` found. ``ok`` is False when ``errors`` is not empty."""

    path: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_tensors: int = 0
    n_files: int = 0
    total_bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)   # dtype → number of tensors
    config: dict = field(default_factory=dict)             # architecture summary from config.json

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        arch = self.config.get("architecture") or self.config.get("model_type") or "unknown architecture"
        layers = self.config.get("layers")
        dt = ", ".join(f"{k} ×{v}" for k, v in sorted(self.dtypes.items(), key=lambda kv: -kv[1]))
        return (f"{self.n_tensors} tensors in {self.n_files} file(s), {self.total_bytes / 1e6:,.1f} MB · {dt} · "
                f"{arch}" + (f", {layers} layers" if layers else ""))


@dataclass
class PairReport:
    """What ``validate_pair`` found: how many tensors will be analysed and what is skipped."""

    base: ValidationReport
    post: ValidationReport
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_analysed: int = 0
    n_skipped: int = 0
    bytes_to_read: int = 0
    mismatched: list[str] = field(default_factory=list)    # "name: base (a, b) vs post (c, b)"

    @property
    def ok(self) -> bool:
        return not self.errors and self.base.ok and self.post.ok


def _open(path, report):
    from opdviz.io.reader import Checkpoint

    try:
        return Checkpoint.open(path)
    except CheckpointError as exc:
        report.errors.append(str(exc))
    except OSError as exc:
        report.errors.append(f"{path}: cannot read ({exc.strerror or exc})")
    return None


def validate_checkpoint(path: str | Path) -> ValidationReport:
    """Open ``path`` with ``opdviz.io.reader.Checkpoint.open`` (headers, dtypes, shapes, offsets, index
    consistency, refusal of pickles) and summarise it. Never raises on bad input."""
    report = ValidationReport(Path(path))
    from opdviz.io.adapters import is_adapter

    if is_adapter(path):
        return _validate_adapter(path, report)
    ckpt = _open(path, report)
    if ckpt is None:
        return report
    with ckpt:
        report.n_tensors = len(ckpt.infos)
        report.n_files = len(ckpt.files)
        report.total_bytes = ckpt.total_bytes
        for info in ckpt.infos.values():
            report.dtypes[info.dtype] = report.dtypes.get(info.dtype, 0) + 1
        cfg = ckpt.config or {}
        archs = cfg.get("architectures") or []
        report.config = {k: v for k, v in {
            "architecture": archs[0] if archs else None, "model_type": cfg.get("model_type"),
            "layers": cfg.get("num_hidden_layers"), "hidden": cfg.get("hidden_size"),
            "vocab": cfg.get("vocab_size")}.items() if v is not None}
        if not ckpt.config:
            report.warnings.append("no config.json next to the weights: fused tensors are split using shapes only")
        if not any(i.is_float for i in ckpt.infos.values()):
            report.errors.append(f"{path}: no floating-point tensors to analyse (dtypes: {sorted(report.dtypes)})")
    return report


def _validate_adapter(path, report: ValidationReport) -> ValidationReport:
    """A PEFT LoRA adapter folder: its config and factors are checked; it is compared against a base."""
    from opdviz.io.adapters import LoraAdapter

    try:
        adapter = LoraAdapter.open(path)
    except CheckpointError as exc:
        report.errors.append(str(exc))
        return report
    with adapter.weights as w:
        report.n_tensors, report.n_files, report.total_bytes = len(w.infos), len(w.files), w.total_bytes
        for info in w.infos.values():
            report.dtypes[info.dtype] = report.dtypes.get(info.dtype, 0) + 1
    s = adapter.summary()
    report.config = {"architecture": f"LoRA adapter (r = {s['r']}, alpha = {s['lora_alpha']}"
                                     + (", rsLoRA" if s["use_rslora"] else "") + f", {s['n_lora_modules']} modules)"}
    return report


def validate_pair(base: str | Path, post: str | Path) -> PairReport:
    """Validate both checkpoints and plan their comparison with ``opdviz.io.reader.plan_pairs``: no common
    tensor is an error (different architectures); shape mismatches (a resized vocabulary) and missing
    tensors are warnings, listed. Never raises on bad input."""
    from opdviz.io.reader import plan_pairs

    report = PairReport(validate_checkpoint(base), validate_checkpoint(post))
    if not (report.base.ok and report.post.ok):
        return report
    b = _open(base, report)
    if b is None:
        return report
    try:
        from opdviz.io.adapters import open_post

        p = open_post(post, b)          # a LoRA adapter is read as its merge into this base
    except CheckpointError as exc:
        b.close()
        report.errors.append(str(exc))
        return report
    with b, p:
        try:
            items = plan_pairs(b, p)
        except CheckpointError:
            report.errors.append(
                f"different architectures: the base and the post-trained checkpoint share no tensor name "
                f"(base has e.g. {list(b.infos)[:3]}, post has e.g. {list(p.infos)[:3]}); pick the post-trained "
                "checkpoint of this base")
            return report
    ok = [i for i in items if i.status == "ok"]
    skipped = [i for i in items if i.status != "ok"]
    report.n_analysed, report.n_skipped = len(ok), len(skipped)
    report.bytes_to_read = sum(i.base.nbytes + i.post.nbytes for i in ok)
    report.mismatched = [f"{i.name}: {i.reason}" for i in skipped if i.reason.startswith("shape mismatch")]
    if report.mismatched:
        report.warnings.append(f"{len(report.mismatched)} tensor(s) differ in shape and will be skipped: "
                               + "; ".join(report.mismatched[:8]) + (" …" if len(report.mismatched) > 8 else ""))
    other = [i for i in skipped if not i.reason.startswith("shape mismatch")]
    if other:
        reasons: dict[str, int] = {}
        for i in other:
            reasons[i.reason] = reasons.get(i.reason, 0) + 1
        report.warnings.append(f"{len(other)} more tensor(s) will be skipped: "
                               + "; ".join(f"{n} × {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])))
    return report
