"""``ScheduleFreeEval``: train with a schedule-free optimizer's training weights, evaluate and save its average."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer

from lightning_adamw.decay import unwrap_optimizer


def is_schedule_free(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or the one inside a ``LightningOptimizer``) keeps train/eval weights."""
    optimizer = unwrap_optimizer(optimizer)
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def _params(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _clone(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in _params(optimizer)]


@torch.no_grad()
def _set_train(optimizer: Optimizer, weights: list[torch.Tensor] | None) -> None:
    # train() sets the optimizer's own mode flags (whatever it keeps); copying the kept weights afterwards makes the
    # switch exact, where train() alone undoes eval()'s interpolation only up to rounding
    optimizer.train()
    if weights is not None:
        for p, w in zip(_params(optimizer), weights):
            p.copy_(w)


def _step_lr(group: dict[str, Any]) -> float:
    # the lr of the step just taken: schedule-free AdamW scales lr by step / warmup_steps while warming up
    warmup, step = group.get("warmup_steps", 0), group.get("step", 0)
    return float(group["lr"]) * (min(1.0, step / warmup) if warmup and step else 1.0)


class ScheduleFreeEval(Callback):
    r"""Keeps a schedule-free optimizer's two sets of weights where they belong in a Lightning run.

    Schedule-free optimizers (``schedulefree_adamw`` from pytorch-optimizer, the ``schedulefree`` package's) train
    at a point ``y`` and average their iterates into ``x``; ``optimizer.eval()`` puts ``x`` into the parameters and
    ``optimizer.train()`` puts ``y`` back. Any optimizer with callable ``train()`` and ``eval()`` counts; with several,
    all of them are switched together. This callback

    1. trains with ``y``: at the start of training and of every epoch, and after each validation inside ``fit``
       (the sanity check included), the exact training weights are put back (kept aside, not recomputed),
    2. validates, tests and predicts with ``x``,
    3. writes ``x`` into each checkpoint's ``state_dict`` (so ``trainer.test(ckpt_path=...)``,
       ``load_from_checkpoint`` and exports get the averaged model) without disturbing the run, and keeps ``y`` in
       its own state, so ``trainer.fit(ckpt_path=...)`` continues exactly as an uninterrupted run,
    4. leaves ``x`` in the module when ``fit`` ends.

    Args:
        warmup: the fraction of the run's optimizer steps (``trainer.estimated_stepping_batches``) over which the
            optimizer warms its lr up, written into each group's ``warmup_steps`` at the start of training; ``None``
            keeps the optimizer's own ``warmup_steps``. Schedule-free methods need no decaying schedule, but do
            want a warm-up (Defazio et al. 2024 warm up over about 5% of the steps).
        log_values: log the lr of each training step (``lr``, or ``lr/pg0``, ``lr/pg1``, ... with several groups),
            warm-up included, as :class:`~lightning_adamw.OneCycleWD` does.

    It costs one copy of the parameters while evaluating, and checkpoints hold the weights twice (``x`` and ``y``).
    Under DDP every rank switches its own replica (they hold the same weights, so nothing is communicated) and only
    the rank that writes the checkpoint computes ``x`` for it. Sharded strategies (FSDP, DeepSpeed) are refused.
    BatchNorm statistics are not recomputed for ``x``. Weights-only checkpoints hold ``y``: Lightning does not call
    callbacks when it saves weights only.

    Example::

        from lightning_adamw import OptimizerConfig
        from lightning_adamw.schedulefree import ScheduleFreeEval
        trainer = Trainer(max_epochs=30, callbacks=[ScheduleFreeEval(warmup=0.05)])
        # configure_optimizers: OptimizerConfig("schedulefree_adamw", lr=2.5e-3, weight_decay=0.05).build(self)
    """

    def __init__(self, warmup: float | None = None, log_values: bool = True) -> None:
        super().__init__()
        if warmup is not None and not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the run's optimizer steps in [0, 1), got {warmup}.")
        self.warmup = warmup
        self.log_values = log_values
        self._optimizers: list[Optimizer] = []
        # exact training weights, one list per schedule-free optimizer: kept while the module holds x ...
        self._train_weights: list[list[torch.Tensor]] | None = None
        # ... or loaded from a checkpoint, put in place once the optimizer state is restored too (train start)
        self._restored: list[list[torch.Tensor]] | None = None
        self._writes_checkpoints = True

    # ---------------------------------------------------------------- switching
    def _schedule_free(self, trainer: pl.Trainer) -> list[Optimizer]:
        self._optimizers = [unwrap_optimizer(o) for o in trainer.optimizers if is_schedule_free(o)]
        return self._optimizers

    def _to_train(self, trainer: pl.Trainer) -> None:
        optimizers = self._schedule_free(trainer)
        weights = self._restored if self._restored is not None else self._train_weights
        if weights is not None and [len(w) for w in weights] != [len(_params(o)) for o in optimizers]:
            raise MisconfigurationException(
                f"The checkpoint's ScheduleFreeEval state holds training weights for {len(weights)} optimizer(s) "
                f"with {[len(w) for w in weights]} parameters, but configure_optimizers now returns "
                f"{len(optimizers)} schedule-free optimizer(s) with {[len(_params(o)) for o in optimizers]}. "
                "Resume with the model and optimizers the checkpoint was written with."
            )
        for i, optimizer in enumerate(optimizers):
            _set_train(optimizer, None if weights is None else weights[i])
        self._train_weights = self._restored = None

    def _to_eval(self, trainer: pl.Trainer) -> None:
        if self._restored is not None:
            self._to_train(trainer)  # a resumed run validating before training starts: x from the exact y
        if self._train_weights is not None:
            return
        optimizers = self._schedule_free(trainer)
        self._train_weights = [_clone(o) for o in optimizers]
        for optimizer in optimizers:
            optimizer.eval()

    def _eval_weights(self) -> dict[int, torch.Tensor]:
        """``x`` of every parameter (by ``id``), computed on the side: the parameters keep ``y`` exactly."""
        averaged: dict[int, torch.Tensor] = {}
        for optimizer in self._optimizers:
            train_weights = _clone(optimizer)
            optimizer.eval()
            averaged.update((id(p), p.detach().clone()) for p in _params(optimizer))
            _set_train(optimizer, train_weights)
        return averaged

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise MisconfigurationException(
                f"ScheduleFreeEval needs every rank to hold the full weights, but {type(trainer.strategy).__name__} "
                "shards them. Use strategy='ddp' (or a single device), or drop ScheduleFreeEval and call the "
                "optimizer's train()/eval() yourself."
            )
        # Strategy.save_checkpoint writes on global rank 0 only: the other ranks need not compute what it saves
        self._writes_checkpoints = trainer.is_global_zero or (
            type(trainer.strategy).save_checkpoint is not Strategy.save_checkpoint
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._schedule_free(trainer):
            names = ", ".join(type(unwrap_optimizer(o)).__name__ for o in trainer.optimizers) or "no optimizer"
            raise MisconfigurationException(
                "ScheduleFreeEval switches schedule-free optimizers (those with train()/eval(), e.g. "
                f"'schedulefree_adamw') between their training and averaged weights, but configure_optimizers returned "
                f"{names}. Return a schedule-free optimizer, e.g. OptimizerConfig('schedulefree_adamw', lr=...)"
                ".build(self), or remove ScheduleFreeEval from the callbacks."
            )
        if any(getattr(c, "save_weights_only", False) for c in trainer.checkpoint_callbacks):
            rank_zero_warn(
                "ModelCheckpoint(save_weights_only=True) writes the training weights, not the averaged ones: Lightning "
                "calls no callback when it saves weights only. Drop save_weights_only (resuming needs the full "
                "checkpoint too) or export the module after fit, when it holds the averaged weights."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the first hook after Lightning restored the module, this callback and the optimizer state (mode flags,
        # step counts, z) from a checkpoint: only now can the training weights go back in
        self._to_train(trainer)
        if self.warmup is not None:
            self._set_warmup(trainer)

    def _set_warmup(self, trainer: pl.Trainer) -> None:
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise MisconfigurationException(
                "ScheduleFreeEval(warmup=...) is a fraction of the run, which has no end: set Trainer(max_epochs=...) "
                "or max_steps, or give the optimizer warmup_steps and drop warmup."
            )
        steps = round(self.warmup * int(total))
        for optimizer in self._optimizers:
            if not all("warmup_steps" in group for group in optimizer.param_groups):
                raise MisconfigurationException(
                    f"ScheduleFreeEval(warmup={self.warmup}) sets the groups' warmup_steps, but "
                    f"{type(optimizer).__name__} has none: drop warmup and warm it up as that optimizer documents."
                )
            for group in optimizer.param_groups:
                group["warmup_steps"] = steps

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_train(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.log_values or not self._optimizers:
            return
        groups = [g for o in self._optimizers for g in o.param_groups]
        for i, group in enumerate(groups):
            name = "lr" if len(groups) == 1 else f"lr/pg{i}"
            pl_module.log(name, _step_lr(group), on_step=True, on_epoch=False)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            self._restored = None  # trainer.validate(ckpt_path=...): the module already holds the checkpoint's x
        self._to_eval(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._to_train(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restored = None
        self._to_eval(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restored = None
        self._to_eval(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not on_train_end: a resumed fit with nothing left to train skips the training hooks
        self._to_eval(trainer)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._train_weights is not None or not self._writes_checkpoints:
            return  # the module holds x already (evaluating, or fit has ended), or this rank writes nothing
        averaged = self._eval_weights()
        state = checkpoint["state_dict"]
        for name, p in pl_module.named_parameters(remove_duplicate=False):
            if id(p) in averaged and name in state:
                state[name] = averaged[id(p)]

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._train_weights = None  # Lightning has just loaded the module weights: what was kept aside is stale

    def state_dict(self) -> dict[str, Any]:
        if not self._writes_checkpoints or not self._optimizers:
            return {}
        if self._train_weights is not None:
            return {"train_weights": self._train_weights}
        return {"train_weights": [_clone(o) for o in self._optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("train_weights")
