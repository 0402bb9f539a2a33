"""Train only a subnetwork: masks of trainable coordinates, applied so frozen ones stay bit-identical.

Masking gradients alone is not enough with AdamW: its decoupled weight decay (``p -= lr·wd·p``)
moves every coordinate whatever its gradient, and Adam's moment buffers are global. So
``apply_masks`` zeroes gradients with hooks (the moments of frozen coordinates stay 0) *and*
``MaskedTrainer.step`` (or ``MaskHandle.restore``) copies the frozen coordinates back after every
optimizer step (2606.13657). Used by ``opdviz.engine.masks.train_only_masked`` and by the demo lab.

    trainer = MaskedTrainer(model, torch.optim.AdamW(model.parameters(), weight_decay=0.1), masks)
    loss.backward(); trainer.step()
"""

from __future__ import annotations

import torch
from torch import nn

from opdviz.errors import OptionsError


class MaskHandle:
    """Returned by ``apply_masks``: ``restore()`` resets frozen coordinates, ``remove()`` drops the hooks."""

    def __init__(self, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor], hooks: list):
        self._params, self._masks, self._hooks = params, masks, hooks
        self._frozen = {k: params[k].detach().clone() for k in masks}

    @torch.no_grad()
    def restore(self) -> None:
        for k, m in self._masks.items():
            p = self._params[k]
            p.copy_(torch.where(m, p, self._frozen[k]))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> MaskHandle:
    """Hook ``model``'s parameters so gradients outside ``masks`` (True = trainable) are zero.

    Parameters absent from ``masks`` are frozen entirely. Call ``handle.restore()`` after each
    optimizer step (or use ``MaskedTrainer``) to undo weight decay on frozen coordinates.
    """
    params = dict(model.named_parameters())
    unknown = set(masks) - set(params)
    if unknown:
        raise OptionsError(f"masks name tensors the model lacks: {sorted(unknown)[:5]}")
    full = {}
    for k, p in params.items():
        m = masks.get(k, torch.zeros(p.shape, dtype=torch.bool))
        if m.shape != p.shape:
            raise OptionsError(f"mask for {k} has shape {tuple(m.shape)}, the parameter {tuple(p.shape)}")
        full[k] = m.to(device=p.device, dtype=torch.bool)
    hooks = [p.register_hook(lambda grad, m=full[k]: grad * m) for k, p in params.items()]
    return MaskHandle(params, full, hooks)


class MaskedTrainer:
    """An optimizer wrapper whose ``step()`` updates only the masked-in coordinates of ``model``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, masks: dict[str, torch.Tensor]):
        self.optimizer = optimizer
        self.handle = apply_masks(model, masks)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.optimizer.step()
        self.handle.restore()

    def close(self) -> None:
        self.handle.remove()

    @staticmethod
    def density(masks: dict[str, torch.Tensor]) -> float:
        """Fraction of trainable coordinates over all masked tensors."""
        total = sum(m.numel() for m in masks.values())
        return sum(int(m.sum()) for m in masks.values()) / max(1, total)
