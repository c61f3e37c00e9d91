"""Decoupled weight decay ``w <- w - lr_t * wd * w``, shared by the callbacks, and ``DecoupledDecay`` on its own."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from lightning_adamw.lognames import group_metric_name
from lightning_adamw.registry import DECAY_OWNER_ATTR, DECOUPLED_WD_KEY


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer inside a ``LightningOptimizer``."""
    return getattr(optimizer, "_optimizer", optimizer)


def amp_will_skip_step(trainer: pl.Trainer, optimizer: Optimizer) -> bool:
    """Whether fp16 mixed precision's GradScaler is about to skip this optimizer's step (inf/nan gradients).

    Only meaningful after the gradients were unscaled, which Lightning does before ``on_before_optimizer_step``.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return False
    # GradScaler keeps no public accessor for this; unscale_ records it per optimizer
    state = scaler._per_optimizer_states.get(id(optimizer), {})
    found = state.get("found_inf_per_device", {})
    return bool(found) and sum(v.item() for v in found.values()) > 0


def group_weight_decay(group: dict[str, Any], default: float | None) -> float:
    """A group's decoupled decay: its ``decoupled_wd`` key, else ``default``; refuses a group that decays itself."""
    wd = group[DECOUPLED_WD_KEY] if DECOUPLED_WD_KEY in group else (default or 0.0)
    if wd > 0 and group.get("weight_decay", 0.0):
        raise MisconfigurationException(
            f"A parameter group has its own weight_decay={group['weight_decay']} in the optimizer and decoupled decay "
            f"{wd} would be applied as well: decay must happen once. Set weight_decay=0 on the optimizer "
            "(torch.optim.AdamW defaults to 0.01) or drop the callback's weight_decay to keep the optimizer's own."
        )
    return float(wd)


def decay_group_(group: dict[str, Any], factor: float) -> None:
    """``w <- (1 - factor) * w`` for the group's parameters that have a gradient (as ``torch.optim.AdamW``)."""
    if not factor:
        return
    params = [p for p in group["params"] if p.grad is not None]
    if params:
        torch._foreach_mul_(params, 1.0 - factor)


class DecoupledDecay(Callback):
    """Decoupled weight decay ``w <- w - lr_t * wd * w`` with whatever lr the optimizer has, and no schedule.

    For use with another lr scheduler (or none): the decay is applied after backward, before the step (in
    ``on_before_optimizer_step``, which Lightning calls before it clips; the decay changes the weights and clipping the
    gradients, so the order changes no number), skipped on steps that fp16 mixed precision skips, and logged as
    ``wd``. With :class:`OneCycleWD` this callback is not needed (and would decay twice): OneCycleWD applies the decay
    itself.

    Args:
        weight_decay: the decay for groups that do not carry ``decoupled_wd`` (set by the registry in decoupled mode).
        log_values: log the decay factor applied.

    Example::

        Trainer(callbacks=[DecoupledDecay(weight_decay=0.05)])  # with e.g. a CosineAnnealingLR from the module
    """

    def __init__(self, weight_decay: float | None = None, log_values: bool = True) -> None:
        super().__init__()
        if weight_decay is not None and weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        self.weight_decay = weight_decay
        self.log_values = log_values
        self._wds: dict[int, list[float]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in map(unwrap_optimizer, trainer.optimizers):
            owner = getattr(optimizer, DECAY_OWNER_ATTR, None)
            if owner is not None and owner is not self and owner in trainer.callbacks:
                raise MisconfigurationException(
                    f"{type(owner).__name__} already applies decoupled weight decay to this optimizer; "
                    "remove DecoupledDecay so the decay happens once."
                )
            setattr(optimizer, DECAY_OWNER_ATTR, self)
            self._wds[id(optimizer)] = [group_weight_decay(g, self.weight_decay) for g in optimizer.param_groups]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        optimizer = unwrap_optimizer(optimizer)
        if getattr(optimizer, DECAY_OWNER_ATTR, None) is None:
            setattr(optimizer, DECAY_OWNER_ATTR, self)
        wds = self._wds.setdefault(id(optimizer), [])
        wds += [group_weight_decay(g, self.weight_decay) for g in optimizer.param_groups[len(wds):]]
        skip = amp_will_skip_step(trainer, optimizer)
        factors = [0.0 if skip else g["lr"] * wd for g, wd in zip(optimizer.param_groups, wds)]
        with torch.no_grad():
            for group, factor in zip(optimizer.param_groups, factors):
                decay_group_(group, factor)
        if self.log_values and any(wds):
            names = [group_metric_name("wd", i, len(factors)) for i in range(len(factors))]
            for name, factor, wd in zip(names, factors, wds):
                if wd > 0:
                    pl_module.log(name, factor, on_step=True, on_epoch=False)
