"""Train only a subnetwork: masks of trainable coordinates, applied so frozen ones stay bit-identical.

The masked training itself (``MaskedTrainer``, ``apply_masks``) lives in the library,
``opdviz.masked_training``; this module adds the lab's masks: what a run changed, and random
masks of the same size.

    masks = changed_masks(base_state, post_state)         # what a run actually changed (bf16 bits)
    trainer = MaskedTrainer(model, torch.optim.AdamW(model.parameters(), weight_decay=0.1), masks)
    loss.backward(); trainer.step()
"""

from __future__ import annotations

import torch

from opdviz.errors import OptionsError
from opdviz.masked_training import MaskedTrainer, MaskHandle, apply_masks  # noqa: F401  (the lab's masked training)


def changed_masks(base: dict[str, torch.Tensor], post: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """name → bool mask of coordinates whose bf16 bits differ between ``base`` and ``post``."""
    if set(base) != set(post):
        raise OptionsError(f"base and post hold different tensors: {sorted(set(base) ^ set(post))[:5]}")
    out = {}
    for k in base:
        a, b = base[k].to(torch.bfloat16), post[k].to(torch.bfloat16)
        out[k] = a.view(torch.int16) != b.view(torch.int16)
    return out


def random_masks_like(masks: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random masks with the same number of True coordinates per tensor as ``masks``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, m in masks.items():
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=g)[: int(m.sum())]] = True
        out[k] = flat.view(m.shape)
    return out
