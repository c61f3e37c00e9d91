"""``FreezeUnfreeze``: train the head with the body frozen, then unfreeze with discriminative lrs and a fresh cycle."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from lightning_adamw.decay import unwrap_optimizer
from lightning_adamw.onecycle import OneCycleWD
from lightning_adamw.registry import even_mults, module_layer_groups
from lightning_adamw.schedules import Schedule


class FreezeUnfreeze(BaseFinetuning):
    """Fine-tuning in two cycles, as the 2018 study's Stanford Cars recipe.

    The LightningModule exposes its layer groups, body first and head last, through a method ``layer_groups()``
    returning a list of modules, and builds its optimizer over all of them (frozen parameters get no gradient, so the
    optimizer and the decay skip them). For ``unfreeze_at_epoch`` epochs every group but the head is frozen, with its
    BatchNorm layers in eval mode (running statistics used, not updated); at that epoch the body is unfrozen and,
    when a :class:`~lightning_adamw.OneCycleWD` callback is present, a fresh cycle starts with ``lrs`` as its peaks
    (OneCycleWD stays the one owner of the lrs). Without OneCycleWD the groups' lrs are set to ``lrs``. At the
    unfreeze the optimizer's state (Adam's moments and step counts, SGD's momentum buffers) is cleared by default, so
    the second phase starts from a fresh optimizer as the study's fastai 0.7 code did (it built a new one);
    ``reset_optimizer_state=False`` carries the head's state over.

    Args:
        unfreeze_at_epoch: the epoch at which the body is unfrozen (Cars recipe: 20).
        lrs: the peak lr of each layer group after unfreezing, body first (Cars recipe ``[3e-3/9, 3e-3/3, 3e-3]``);
            one value applies to all groups; ``None`` keeps the first cycle's peaks.
        train_bn: keep training the frozen groups' BatchNorm layers (fastai's ``train_bn``); default eval mode.
        reset_optimizer_state: clear the optimizer's per-parameter state at the unfreeze (a fresh optimizer, as the
            study and fastai's ``unfreeze``, which calls ``opt.clear_state()``); ``False`` keeps it.
        lr_range: ``(lo, hi)`` instead of ``lrs``, fastai's ``slice(lo, hi)``: the peaks spread geometrically over
            the layer groups, ``lo`` for the first and ``hi`` for the head (``(3e-3/9, 3e-3)`` over three groups is
            the Cars recipe's list).

    :meth:`fine_tune` builds this callback and its OneCycleWD in one call, as fastai's ``Learner.fine_tune``.

    Example::

        unfreeze = FreezeUnfreeze(unfreeze_at_epoch=20, lrs=[3e-3 / 9, 3e-3 / 3, 3e-3])
        trainer = Trainer(max_epochs=60, callbacks=[OneCycleWD(OneCycle2018(pct=0.1)), unfreeze])
    """

    def __init__(
        self,
        unfreeze_at_epoch: int,
        lrs: float | list[float] | None = None,
        train_bn: bool = False,
        reset_optimizer_state: bool = True,
        lr_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if unfreeze_at_epoch < 0:
            raise ValueError(f"unfreeze_at_epoch must be >= 0, got {unfreeze_at_epoch}.")
        if lr_range is not None:
            if lrs is not None:
                raise ValueError(f"Give lrs or lr_range, not both (got lrs={lrs}, lr_range={list(lr_range)}).")
            if len(lr_range) != 2 or not 0 < lr_range[0] <= lr_range[1]:
                raise ValueError(f"lr_range must be [lo, hi] with 0 < lo <= hi, got {lr_range}.")
        self.lr_range = lr_range
        lr_list = [lrs] if isinstance(lrs, (int, float)) else lrs
        if lr_list is not None and (not lr_list or any(x <= 0 for x in lr_list)):
            raise ValueError(f"lrs must be positive, got {lrs}.")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.lrs = lr_list
        self.train_bn = train_bn
        self.reset_optimizer_state = reset_optimizer_state
        self._cycle_started = False

    @classmethod
    def fine_tune(
        cls,
        freeze_epochs: int,
        lr: float,
        unfrozen_lr: float | None = None,
        lr_mult: float = 100.0,
        schedule: Schedule | None = None,
        weight_decay: float | None = None,
        train_bn: bool = False,
    ) -> list[pl.Callback]:
        """fastai's ``Learner.fine_tune`` as two callbacks for ``Trainer(max_epochs=total, callbacks=...)``.

        For ``freeze_epochs`` epochs the head trains alone in one cycle peaking at ``lr``; then the body is unfrozen
        and a fresh cycle runs to the end with peaks from ``unfrozen_lr / lr_mult`` (first group) to ``unfrozen_lr``
        (head), spread geometrically (fastai: ``slice(base_lr / 2 / lr_mult, base_lr / 2)``, hence the defaults
        ``unfrozen_lr = lr / 2`` and ``lr_mult = 100``). Both cycles have the shape ``schedule``.

        Example (the 2018 Stanford Cars recipe: 20 epochs head at 1e-2, then 40 at [3e-3/9, 3e-3/3, 3e-3])::

            cbs = FreezeUnfreeze.fine_tune(20, lr=1e-2, unfrozen_lr=3e-3, lr_mult=9, schedule=OneCycle2018(pct=0.1))
            Trainer(max_epochs=60, callbacks=cbs)
        """
        if lr <= 0 or lr_mult < 1:
            raise ValueError(f"fine_tune needs lr > 0 and lr_mult >= 1, got lr={lr}, lr_mult={lr_mult}.")
        top = lr / 2 if unfrozen_lr is None else unfrozen_lr
        return [
            OneCycleWD(schedule, max_lr=lr, weight_decay=weight_decay),
            cls(freeze_epochs, train_bn=train_bn, lr_range=(top / lr_mult, top)),
        ]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "cycle_started": self._cycle_started}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._cycle_started = bool(state_dict.get("cycle_started", False))

    @staticmethod
    def layer_groups(pl_module: pl.LightningModule) -> list[nn.Module]:
        """The module's layer groups (body first, head last): its ``layer_groups()``, else the default split of the
        torchvision backbone it holds (:func:`~lightning_adamw.backbone_layer_groups`)."""
        groups = module_layer_groups(pl_module)
        if groups is None:
            raise MisconfigurationException(
                f"FreezeUnfreeze needs {type(pl_module).__name__}.layer_groups() returning a list of modules, body "
                "first and head last (e.g. [model.layer1, model.layer3, model.head]); a module holding one "
                "torchvision ResNet, EfficientNet or ConvNeXt gets lightning_adamw.backbone_layer_groups by default."
            )
        if len(groups) < 2 or not all(isinstance(g, nn.Module) for g in groups):
            raise MisconfigurationException(
                f"{type(pl_module).__name__}.layer_groups() must return at least two modules (body groups, then head)."
            )
        return groups

    def _onecycle(self, trainer: pl.Trainer) -> OneCycleWD | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, OneCycleWD)), None)

    def _steps_per_epoch(self, trainer: pl.Trainer) -> int:
        return -(-int(trainer.num_training_batches) // trainer.accumulate_grad_batches)

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(self.layer_groups(pl_module)[:-1], train_bn=self.train_bn)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lr_range is not None:
            self.lrs = even_mults(*self.lr_range, len(self.layer_groups(pl_module)))
        in_optimizer = {id(p) for opt in map(unwrap_optimizer, trainer.optimizers)
                        for g in opt.param_groups for p in g["params"]}
        missing = [n for n, p in pl_module.named_parameters() if id(p) not in in_optimizer
                   and any(p is q for grp in self.layer_groups(pl_module) for q in grp.parameters())]
        if missing:
            raise MisconfigurationException(
                f"FreezeUnfreeze expects every layer group's parameters in the optimizer (frozen ones get no gradient "
                f"and are skipped), but {len(missing)} are not, e.g. {missing[:3]}. Build the optimizer from "
                "pl_module.layer_groups() without filtering on requires_grad."
            )
        onecycle = self._onecycle(trainer)
        if onecycle is not None and self.unfreeze_at_epoch > 0:
            onecycle.plan_cycle_boundaries([self.unfreeze_at_epoch * self._steps_per_epoch(trainer)])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._cycle_started:
            # resumed after the unfreeze: setup() froze the body again (Lightning issue #21901), and a run resumed
            # mid-epoch gets no on_train_epoch_start (hence no finetune_function) before its next batch
            body = self.layer_groups(pl_module)[:-1]
            self.make_trainable(body)
            for group in body:
                group.train()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if trainer.current_epoch < self.unfreeze_at_epoch and not self.train_bn:
            for group in self.layer_groups(pl_module)[:-1]:
                for module in group.modules():
                    if isinstance(module, _BatchNorm):
                        module.eval()

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if epoch < self.unfreeze_at_epoch:
            return
        body = self.layer_groups(pl_module)[:-1]
        if all(p.requires_grad for g in body for p in g.parameters()):
            return  # unfrozen earlier (or resumed after the unfreeze)
        self.make_trainable(body)
        for group in body:
            group.train()
        trainer = pl_module.trainer
        onecycle = self._onecycle(trainer)
        optimizer = unwrap_optimizer(optimizer)
        idx = next(i for i, o in enumerate(trainer.optimizers) if unwrap_optimizer(o) is optimizer)
        if self._cycle_started:
            return  # a resumed run: the fresh cycle is already in OneCycleWD's restored state
        self._cycle_started = True
        if self.reset_optimizer_state:
            optimizer.state.clear()  # torch optimizers build a parameter's state afresh at its next step
        if onecycle is not None:
            onecycle.start_cycle(trainer, self.lrs, optimizer_idx=idx)
        elif self.lrs is not None:
            for group, lr in zip(optimizer.param_groups, OneCycleWD._per_group(optimizer, list(self.lrs), "lrs")):
                group["lr"] = lr
