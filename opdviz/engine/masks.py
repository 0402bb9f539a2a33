"""Subnetwork masks: which coordinates a run changed, per criterion, exported and trainable.

``changed_chunks`` evaluates every "changed" criterion of ``AnalysisOptions.criteria()`` on one tensor
pair, chunk by chunk (the overlap and trajectory jobs count with it); ``write_masks`` streams a
base/post pair one tensor at a time into a safetensors file of bool masks (or bit-packed uint8
with the shape in the metadata); ``load_masks`` reads either back; ``train_only_masked`` makes an
optimizer update only the masked-in coordinates.

    opdviz masks --base BASE --post POST --criterion abs_1e-5 --out masks.safetensors [--packed]

    masks = load_masks("masks.safetensors")
    handle = train_only_masked(model, masks, optimizer)      # then train as usual
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from opdviz.io.adapters import open_post
from opdviz.errors import OptionsError, StoreError
from opdviz.masked_training import MaskedTrainer, MaskHandle, apply_masks
from opdviz.metrics.chunkops import floor32
from opdviz.options import CRITERION_KINDS
from opdviz.io.reader import Checkpoint, iter_pairs, plan_pairs
from opdviz.io.safefiles import Limits, loads_json

__all__ = ["Criterion", "parse_criterion", "changed_chunks", "changed_mask", "write_masks", "load_masks",
           "train_only_masked", "apply_masks", "MaskHandle", "MaskedTrainer"]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
PACKED_FORMAT = "opdviz-packed-bits-v1"


@dataclass(frozen=True)
class Criterion:
    """A parsed criterion name: kind ("exact", "abs", "relrms", "bf16") and its threshold."""

    name: str
    kind: str
    value: float = 0.0


def parse_criterion(name: str) -> Criterion:
    """``"abs_1e-5"`` → Criterion("abs_1e-5", "abs", 1e-5). The names are those of ``AnalysisOptions.criteria()``:
    exact | abs_ε | relrms_τ | bf16_η (DESIGN.md, "Metrics")."""
    if name == "exact":
        return Criterion(name, "exact")
    kind, _, val = name.partition("_")
    try:
        value = float(val)
    except ValueError:
        value = float("nan")
    if kind not in CRITERION_KINDS[1:] or not 0 < value < float("inf"):     # [1:]: all but "exact"
        raise OptionsError(f"unknown criterion {name!r}: use exact, abs_<eps>, relrms_<tau> or bf16_<eta> "
                           "with a finite threshold > 0 (e.g. abs_1e-5)")
    return Criterion(name, kind, value)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.element_size()])


def base_rms(wb: torch.Tensor, chunk: int) -> float:
    """RMS of the stored base values, accumulated in float64 over flat chunks."""
    flat = wb.reshape(-1)
    total = 0.0
    for i in range(0, flat.numel(), chunk):
        x = flat[i:i + chunk].double()
        total += float(torch.dot(x, x))
    return math.sqrt(total / max(1, flat.numel()))


def changed_chunks(wb: torch.Tensor, wp: torch.Tensor, criteria: tuple[str, ...] | list[str],
                   chunk: int = 1 << 24) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
    """Yield ``(slice, {criterion: bool mask})`` over the flattened pair, ``chunk`` elements at a time.

    The numerics of ``opdviz.metrics.elementwise`` (whose masks the job stores only for the default
    criterion and exact, so the overlap and trajectory jobs, which need every criterion, use this):
    ΔW = W_post − W_base in float32 from the stored values (float64 for fp64); exact = stored bits
    differ; abs_ε: |ΔW| > ε and relrms_τ: |ΔW| > τ·RMS(W_base) compared as if in float64 (threshold
    rounded down to float32 with elementwise's ``floor32``); bf16_η: |ΔW| > fl(η·max(|W_base|, |W_post|))
    in ΔW's dtype. ``tests/engine/test_masks.py`` checks the masks equal elementwise's for every criterion.
    The masks are valid until the next chunk.
    """
    if wb.shape != wp.shape or wb.dtype != wp.dtype:
        raise OptionsError(f"changed masks need tensors of one shape and dtype, got {tuple(wb.shape)} {wb.dtype} "
                           f"and {tuple(wp.shape)} {wp.dtype}")
    crits = [parse_criterion(c) for c in criteria]
    rms = base_rms(wb, chunk) if any(c.kind == "relrms" for c in crits) else 0.0
    f64 = wb.dtype == torch.float64
    cut = (lambda t: t) if f64 else (lambda t: float(floor32(t)))
    limits = {c.name: cut(c.value) if c.kind == "abs" else cut(c.value * rms) if c.kind == "relrms"
              else (c.value if f64 else float(np.float32(c.value))) for c in crits if c.kind != "exact"}
    fdt = torch.float64 if f64 else torch.float32
    fb, fp = wb.reshape(-1), wp.reshape(-1)
    n = fb.numel()
    for i in range(0, n, chunk):
        sl = slice(i, min(n, i + chunk))
        b, p = fb[sl], fp[sl]
        b32, p32 = b.to(fdt), p.to(fdt)
        ad = (p32 - b32).abs_()
        big = None
        out = {}
        for c in crits:
            if c.kind == "exact":
                out[c.name] = _bits(b) != _bits(p)
            elif c.kind in ("abs", "relrms"):
                out[c.name] = ad > limits[c.name]
            else:
                if big is None:
                    big = torch.maximum(b32.abs(), p32.abs())
                out[c.name] = ad > big.mul(limits[c.name])
        yield sl, out


def changed_mask(wb: torch.Tensor, wp: torch.Tensor, criterion: str, chunk: int = 1 << 24) -> torch.Tensor:
    """The bool changed mask of one pair under ``criterion``, shaped like ``wb``."""
    out = torch.empty(wb.numel(), dtype=torch.bool, device=wb.device)
    for sl, masks in changed_chunks(wb, wp, (criterion,), chunk):
        out[sl] = masks[criterion]
    return out.view(wb.shape)


# ------------------------------------------------------------------------------------------ export
def write_masks(base: str | Path, post: str | Path, out: str | Path, criterion: str = "abs_1e-5", *,
                packed: bool = False, allow_pickle: bool = False, chunk: int = 1 << 24, log=print) -> dict:
    """Write the changed mask of every comparable tensor of ``post`` vs ``base`` to ``out`` (safetensors).

    Streams one tensor pair at a time; masks are named like the base tensors. ``packed``: each mask is
    ``np.packbits`` of the flat mask (uint8, big bit order) and the metadata ``opdviz.shapes`` holds
    the shapes. Returns {"tensors", "numel", "changed", "skipped"}. Peak memory: one pair plus the
    masks (1 byte per coordinate, 1/8 packed) — the masks of the whole model are held until written.
    """
    parse_criterion(criterion)
    out = Path(out)
    masks: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    numel = changed = 0
    with Checkpoint.open(base, allow_pickle=allow_pickle) as b, open_post(post, b, allow_pickle=allow_pickle) as p:
        items = plan_pairs(b, p)
        skipped = [(i.name, i.reason) for i in items if i.status != "ok"]
        for item, wb, wp in iter_pairs(b, p, items):
            m = changed_mask(wb, wp, criterion, chunk)
            numel += m.numel()
            changed += int(m.sum())
            shapes[item.name] = list(m.shape)
            masks[item.name] = (torch.from_numpy(np.packbits(m.reshape(-1).numpy())) if packed else m.contiguous())
            del wb, wp, m
    meta = {"opdviz.format": PACKED_FORMAT if packed else "bool", "opdviz.criterion": criterion,
            "opdviz.base": str(Path(base).resolve()), "opdviz.post": str(Path(post).resolve()),
            "opdviz.shapes": json.dumps(shapes)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        save_file(masks, str(tmp), metadata=meta)
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write masks to {out}: {exc}; choose a writable --out path") from exc
    for name, reason in skipped:
        log(f"skipped {name}: {reason}")
    return {"tensors": len(masks), "numel": numel, "changed": changed, "skipped": len(skipped)}


def load_masks(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a mask file written by ``write_masks`` (bool or packed) → name → bool tensor of the weight's shape."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for unreadable files
        raise StoreError(f"{path}: cannot read as a safetensors mask file ({exc}); write it with `opdviz masks`") from exc
    packed = meta.get("opdviz.format") == PACKED_FORMAT
    shapes = loads_json(meta.get("opdviz.shapes", "{}").encode(), f"{path}: metadata opdviz.shapes", Limits.from_env(),
                        error=StoreError)
    if not isinstance(shapes, dict):
        raise StoreError(f"{path}: metadata opdviz.shapes is not a mapping; the file is damaged")
    out = {}
    for name, t in raw.items():
        if packed:
            shape = shapes.get(name)
            if shape is None:
                raise StoreError(f"{path}: packed mask {name!r} has no shape in the metadata; the file is damaged")
            n = math.prod(shape)
            bits = np.unpackbits(t.numpy(), count=n).astype(bool)
            out[name] = torch.from_numpy(bits).view(shape).to(device)
        else:
            out[name] = t.to(device=device, dtype=torch.bool)
    return out


# ------------------------------------------------------------------------------------------ training
def train_only_masked(model: torch.nn.Module, masks: dict[str, torch.Tensor],
                      optimizer: torch.optim.Optimizer | None = None) -> MaskHandle:
    """Train only the True coordinates of ``masks`` (parameter name → bool mask; absent names are frozen).

    Gradients outside the masks are zeroed by hooks, and — because AdamW's decoupled weight decay
    moves every coordinate whatever its gradient — frozen coordinates are copied back after every
    ``optimizer.step()`` (a step post-hook when ``optimizer`` is given; else call ``handle.restore()``
    yourself). Wraps ``opdviz.masked_training.apply_masks``. ``handle.remove()`` undoes both.
    """
    handle = apply_masks(model, masks)
    if optimizer is not None:
        hook = optimizer.register_step_post_hook(lambda *_: handle.restore())
        handle._hooks.append(hook)
    return handle
