"""Decoupled weight decay ``w <- w - rate * wd * w``: the one component that decides and applies it, and
``DecoupledDecay``, the callback that gives it to a run with any lr scheduler.

One :class:`DecoupledWeightDecay` per optimizer decides each parameter group's decay and applies it inside
``optimizer.step()``, after the closure and before the update, as ``torch.optim.AdamW`` does. The registry attaches
it to the optimizers it builds in decoupled mode, so such an optimizer decays by itself in any loop (a plain PyTorch
loop, Lightning's ``Tuner.lr_find``, any lr scheduler). A callback may *claim* it, one callback per optimizer:
:class:`~lightning_adamw.OneCycleWD` to decay with its schedule (``lr_t * wd`` or ``eta_t * wd``), or
:class:`DecoupledDecay` to give a plain ``torch.optim`` optimizer a decay and log it. Combinations that would decay
twice, or that would apply nothing, are refused when training starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from lightning_adamw.lognames import group_metric_name

#: Parameter-group key holding the group's decoupled weight decay (set by the registry in decoupled mode).
DECOUPLED_WD_KEY = "decoupled_wd"
_ATTR = "_lightning_adamw_decoupled_decay"


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer inside a ``LightningOptimizer``."""
    return getattr(optimizer, "_optimizer", optimizer)


def is_schedule_free(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or the one inside a ``LightningOptimizer``) keeps train/eval weights."""
    optimizer = unwrap_optimizer(optimizer)
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def _group_lr(group: dict[str, Any]) -> float:
    return float(group["lr"])


class DecoupledWeightDecay:
    """The decoupled weight decay of one optimizer: ``w <- w - rate_g * wd_g * w`` for each parameter group ``g``.

    ``wd_g`` is the group's ``decoupled_wd`` (the registry's decision), else the claiming callback's
    ``weight_decay`` (with ``claim(decide=...)``, what the callback decides for every group); ``rate_g`` is the
    group's lr at the step unless the claiming callback says otherwise. The decay runs in an ``optimizer.step``
    pre-hook: with a closure (Lightning evaluates forward, backward, ``on_before_optimizer_step`` and gradient
    clipping inside ``optimizer.step``) it runs once the closure has returned, without one (a hand-written loop) at
    once; either way after backward and before the update, on the parameters that have a gradient, as
    ``torch.optim.AdamW``. A step that fp16 mixed precision skips never calls
    ``optimizer.step``, so nothing is decayed then.

    Use :meth:`attach` to get the one instance of an optimizer, never the constructor twice.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if is_schedule_free(optimizer):
            raise MisconfigurationException(
                f"{type(optimizer).__name__} is schedule-free: it decays its own interpolated point, so decoupled "
                "decay cannot be applied from outside. Give the decay to the optimizer (its weight_decay, or "
                "OptimizerConfig('schedulefree_adamw', weight_decay=...)) and drop the callback's weight_decay."
            )
        self.optimizer = optimizer
        self.owner: object | None = None
        self.weight_decay = 0.0  # for groups without decoupled_wd
        self.rate: Callable[[dict[str, Any]], float] = _group_lr
        self.decide: Callable[[int, dict[str, Any]], float] | None = None
        self._checked = 0  # groups whose own weight_decay was checked
        self._applied: list[float] | None = None
        optimizer.register_step_pre_hook(self._pre_step)
        setattr(optimizer, _ATTR, self)

    @staticmethod
    def of(optimizer: Any) -> DecoupledWeightDecay | None:
        """The decay attached to ``optimizer`` (a torch or Lightning optimizer), or ``None``."""
        return getattr(unwrap_optimizer(optimizer), _ATTR, None)

    @classmethod
    def attach(cls, optimizer: Any) -> DecoupledWeightDecay:
        """The decay of ``optimizer``, attached now if it has none."""
        optimizer = unwrap_optimizer(optimizer)
        return cls.of(optimizer) or cls(optimizer)

    # ---------------------------------------------------------------- the decision
    def claim(
        self,
        owner: object,
        weight_decay: float | None = None,
        rate: Callable[[dict[str, Any]], float] | None = None,
        decide: Callable[[int, dict[str, Any]], float] | None = None,
    ) -> list[float]:
        """Make ``owner`` (a callback) the one that drives this decay; returns each group's ``wd``.

        Args:
            weight_decay: the decay for groups without ``decoupled_wd``.
            rate: ``group -> rate`` multiplying ``wd`` at each step; ``None``: the group's lr.
            decide: ``(group index, group) -> wd`` deciding every group's decay instead of ``decoupled_wd`` and
                ``weight_decay`` (OneCycleWD's ``weight_decay_timescale``); it refuses a group it cannot decide.

        Raises:
            MisconfigurationException: another callback drives it already, ``weight_decay`` would reach no group,
                or a group also decays through the optimizer's own ``weight_decay``.
        """
        name = type(owner).__name__
        if self.owner is not None and self.owner is not owner:
            raise MisconfigurationException(
                f"{type(self.owner).__name__} and {name} would both apply decoupled weight decay to "
                f"{type(self.optimizer).__name__}: decay must happen once. Keep one: OneCycleWD decays with the 1cycle "
                "schedule (its weight_decay, or the optimizer's decoupled mode); DecoupledDecay is for runs with "
                "another lr scheduler."
            )
        if weight_decay and all(DECOUPLED_WD_KEY in g for g in self.optimizer.param_groups):
            raise MisconfigurationException(
                f"{name}(weight_decay={weight_decay}) applies to parameter groups that do not say their own decoupled "
                "decay, but every group of this optimizer does (`decoupled_wd`, set by OptimizerConfig / "
                "build_optimizer): the value would change nothing. Drop it from the callback and set weight_decay "
                "(with wd_mode='decoupled') in the optimizer's config."
            )
        if decide is not None and weight_decay is not None:
            raise ValueError("claim() takes weight_decay or decide, not both.")
        self.owner, self.weight_decay = owner, float(weight_decay or 0.0)
        self.rate = rate or _group_lr
        self.decide = decide
        self._checked = 0
        return self.group_decays()

    def group_decays(self) -> list[float]:
        """Each group's ``wd``; a group that would also decay through the optimizer's own ``weight_decay`` raises."""
        groups = self.optimizer.param_groups
        if self.decide is not None:
            wds = [float(self.decide(i, g)) for i, g in enumerate(groups)]
        else:
            wds = [float(g.get(DECOUPLED_WD_KEY, self.weight_decay)) for g in groups]
        for group, wd in list(zip(groups, wds))[self._checked:]:
            if wd > 0 and group.get("weight_decay", 0.0):
                raise MisconfigurationException(
                    f"A parameter group has its own weight_decay={group['weight_decay']} in "
                    f"{type(self.optimizer).__name__} and decoupled decay {wd} would be applied as well: decay must "
                    "happen once. Set weight_decay=0 on the optimizer (torch.optim.AdamW defaults to 0.01) or drop "
                    "the callback's weight_decay to keep the optimizer's own."
                )
        self._checked = len(groups)
        return wds

    def factors(self) -> list[float]:
        """``rate_g * wd_g`` for each group at this step (with the lrs and rate as they are now)."""
        return [self.rate(g) * wd if wd else 0.0 for g, wd in zip(self.optimizer.param_groups, self.group_decays())]

    # ---------------------------------------------------------------- the application
    @torch.no_grad()
    def apply(self) -> list[float]:
        """``w <- (1 - rate_g * wd_g) * w`` now, for the parameters that have a gradient; returns the factors."""
        factors = self.factors()
        for group, factor in zip(self.optimizer.param_groups, factors):
            params = [p for p in group["params"] if p.grad is not None]
            if factor and params:
                torch._foreach_mul_(params, 1.0 - factor)
        self._applied = factors
        return factors

    def pop_applied(self) -> list[float] | None:
        """The factors applied since the last call (``None``: no step decayed, e.g. fp16 skipped it)."""
        applied, self._applied = self._applied, None
        return applied

    def _pre_step(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.apply()  # gradients are there already
            return None
        done = False

        def closure_then_decay() -> Any:
            nonlocal done
            loss = closure()
            if not done:  # once per step, also for optimizers that evaluate the closure several times (LBFGS)
                done = True
                self.apply()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_decay}
        return (args[0], closure_then_decay, *args[2:]), kwargs


class DecoupledDecay(Callback):
    """Decoupled weight decay ``w <- w - lr_t * wd * w`` with whatever lr the optimizer has, and no schedule.

    For use with another lr scheduler (or none). Optimizers built by the registry in decoupled mode decay by
    themselves; this callback gives the decay to a plain ``torch.optim`` optimizer (``weight_decay``) and logs the
    factor applied as ``wd``. The decay is applied after backward and clipping, before the step, and skipped on steps
    that fp16 mixed precision skips. With :class:`OneCycleWD` it is refused: OneCycleWD applies the decay itself.

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
        self._stepping: set[int] = set()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        if any([any(DecoupledWeightDecay.attach(o).claim(self, self.weight_decay)) for o in optimizers]):
            return
        own = [(type(o).__name__, g["weight_decay"]) for o in optimizers for g in o.param_groups
               if g.get("weight_decay", 0.0)]
        why = (f"{own[0][0]} decays by its own weight_decay={own[0][1]}" if own
               else "no parameter group has a decoupled weight decay")
        raise MisconfigurationException(
            f"DecoupledDecay has nothing to apply: {why}. Give it weight_decay=... (with the optimizer's own "
            "weight_decay at 0), build the optimizer with wd_mode='decoupled', or remove DecoupledDecay."
        )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._stepping.add(id(unwrap_optimizer(optimizer)))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        for idx, optimizer in enumerate(optimizers):
            if id(optimizer) not in self._stepping:
                continue
            self._stepping.discard(id(optimizer))
            decay = DecoupledWeightDecay.attach(optimizer)
            wds = decay.group_decays()
            factors = decay.pop_applied() or [0.0] * len(wds)
            if self.log_values:
                names = [group_metric_name("wd", i, len(factors), idx, len(optimizers)) for i in range(len(factors))]
                for name, factor, wd in zip(names, factors, wds):
                    if wd > 0:
                        pl_module.log(name, factor, on_step=True, on_epoch=False)
