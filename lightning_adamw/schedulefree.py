"""``ScheduleFreeEval``: train with a schedule-free optimizer's training weights, evaluate and save its average."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from lightning_adamw.decay import is_schedule_free, unwrap_optimizer
from lightning_adamw.lognames import group_metric_name


def _params(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _clone(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in _params(optimizer)]


def _batch_norms(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _bn_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b for m in _batch_norms(module) for b in (m.running_mean, m.running_var, m.num_batches_tracked)]


@torch.no_grad()
def _copy_into(targets: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for target, value in zip(targets, values):
        target.copy_(value)


@torch.no_grad()
def update_bn(module: nn.Module, batches: Any, strategy: Any = None) -> None:
    """Re-estimate ``module``'s BatchNorm running statistics from ``batches`` at its current weights.

    ``torch.optim.swa_utils.update_bn`` re-estimates (statistics reset and averaged over the batches with the module
    in training mode; ``module(batch[0])`` for a tuple or list batch, ``module(batch)`` otherwise). This wrapper adds
    what a re-estimation in the middle of a training run needs and torch's lacks: the global RNG is forked, so
    dropout in these passes leaves the run's random stream untouched; every submodule's train/eval mode is restored
    (torch's sets the top module's mode on all of them); with a distributed ``strategy`` the statistics are pooled
    over the ranks (mean of the means and of the second moments).
    """
    modes = [(m, m.training) for m in module.modules()]
    device = next(iter(module.parameters())).device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.optim.swa_utils.update_bn(batches, module)
    for m, training in modes:
        m.training = training
    if strategy is not None and getattr(strategy, "world_size", 1) > 1:
        for m in _batch_norms(module):
            second = m.running_var + m.running_mean * m.running_mean
            pooled = strategy.reduce(torch.cat([m.running_mean, second]), reduce_op="mean")
            mean, second = pooled.split(len(m.running_mean))
            m.running_mean.copy_(mean)
            m.running_var.copy_(second - mean * mean)


class WeightSwap:
    """A schedule-free run's two sets of weights in one module: the training point ``y`` and the average ``x``.

    :meth:`to_eval` keeps ``y`` aside (and, when the BatchNorm statistics are re-estimated at ``x``, the training
    statistics, which belong to ``y``) and lets the optimizers' ``eval()`` write ``x``; :meth:`to_train` puts the
    kept tensors back by copying them, where ``train()`` alone undoes ``eval()``'s interpolation only up to
    rounding. Training weights loaded with :meth:`load_state_dict` wait for the next :meth:`to_train`, when the
    optimizer state is restored too. The callback sets :attr:`module` and :attr:`optimizers` (the schedule-free
    ones) before it switches.

    Args:
        keep_bn: save the module's training BatchNorm statistics in :meth:`state_dict` too.
    """

    def __init__(self, keep_bn: bool = False) -> None:
        self.keep_bn = keep_bn
        self.module: nn.Module | None = None
        self.optimizers: list[Optimizer] = []
        # y, one list per optimizer, and the training BatchNorm statistics: kept while the module holds x ...
        self._weights: list[list[torch.Tensor]] | None = None
        self._bn: list[torch.Tensor] | None = None
        # ... or loaded from a checkpoint, put in place at the next to_train
        self._loaded: list[list[torch.Tensor]] | None = None
        self._loaded_bn: list[torch.Tensor] | None = None

    @property
    def holds_average(self) -> bool:
        """Whether the module holds ``x`` (``y`` kept aside)."""
        return self._weights is not None

    @torch.no_grad()
    def to_train(self) -> None:
        """Put ``y`` (kept or loaded) and its BatchNorm statistics into the module, the optimizers in training mode."""
        weights = self._loaded if self._loaded is not None else self._weights
        if weights is not None and [len(w) for w in weights] != [len(_params(o)) for o in self.optimizers]:
            raise MisconfigurationException(
                f"The checkpoint's ScheduleFreeEval state holds training weights for {len(weights)} optimizer(s) "
                f"with {[len(w) for w in weights]} parameters, but configure_optimizers now returns "
                f"{len(self.optimizers)} schedule-free optimizer(s) with {[len(_params(o)) for o in self.optimizers]}. "
                "Resume with the model and optimizers the checkpoint was written with."
            )
        for i, optimizer in enumerate(self.optimizers):
            optimizer.train()  # sets the optimizer's own mode flags, whatever it keeps
            if weights is not None:
                _copy_into(_params(optimizer), weights[i])
        statistics = self._loaded_bn if self._loaded_bn is not None else self._bn
        if statistics is not None:
            _copy_into(_bn_buffers(self.module), statistics)
        self._weights = self._loaded = self._bn = self._loaded_bn = None

    def to_eval(self, update_bn: Callable[[], bool] | None = None) -> None:
        """Put ``x`` into the module, keeping ``y`` aside; a no-op while it holds ``x`` already.

        Args:
            update_bn: called with ``x`` in the module to re-estimate its BatchNorm statistics; returns whether it
                did (the training statistics are then kept, to be put back by :meth:`to_train`).
        """
        if self._loaded is not None:
            self.to_train()  # a resumed run validating before training starts: x from the exact y
        if self.holds_average:
            return
        self._weights = [_clone(o) for o in self.optimizers]
        for optimizer in self.optimizers:
            optimizer.eval()
        if update_bn is not None and self.optimizers and _batch_norms(self.module):
            previous = [b.clone() for b in _bn_buffers(self.module)]
            self._bn = previous if update_bn() else None

    def write_average(self, state: dict[str, torch.Tensor], update_bn: Callable[[], bool] | None = None) -> None:
        """Write ``x`` (and its BatchNorm statistics) into a module ``state`` dict, computed on the side: the module
        gets ``y`` and its training statistics back exactly."""
        self.to_eval(update_bn)
        averaged = {id(p): p.detach().clone() for o in self.optimizers for p in _params(o)}
        statistics = {id(b): b.clone() for b in _bn_buffers(self.module)} if self._bn is not None else {}
        self.to_train()
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if id(p) in averaged and name in state:
                state[name] = averaged[id(p)]
        for name, b in self.module.named_buffers(remove_duplicate=False):
            if id(b) in statistics and name in state:
                state[name] = statistics[id(b)]

    def forget_kept(self) -> None:
        """Drop the kept ``y``: the module's weights were just loaded from a checkpoint."""
        self._weights = self._bn = None

    def forget_loaded(self) -> None:
        """Drop loaded training weights: evaluating a checkpoint, whose module state holds ``x``."""
        self._loaded = self._loaded_bn = None

    def state_dict(self) -> dict[str, Any]:
        """``y`` (and with ``keep_bn`` the training BatchNorm statistics), wherever the module is now."""
        if not self.optimizers:
            return {}
        weights = self._weights if self._weights is not None else [_clone(o) for o in self.optimizers]
        state: dict[str, Any] = {"train_weights": weights}
        if self.keep_bn and self.module is not None and _batch_norms(self.module):
            state["train_bn"] = self._bn if self._bn is not None else [b.clone() for b in _bn_buffers(self.module)]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("train_weights")
        self._loaded_bn = state_dict.get("train_bn")


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
    3. with ``bn_batches``, re-estimates the BatchNorm statistics at ``x`` before each evaluation (and for each
       checkpoint), from the last training batches, and puts the training statistics back for training,
    4. writes ``x`` into each checkpoint's ``state_dict`` (so ``trainer.test(ckpt_path=...)``,
       ``load_from_checkpoint`` and exports get the averaged model) without disturbing the run, and keeps ``y`` in
       its own state, so ``trainer.fit(ckpt_path=...)`` continues exactly as an uninterrupted run,
    5. leaves ``x`` in the module when ``fit`` ends.

    Args:
        warmup: the fraction of the run's optimizer steps (``trainer.estimated_stepping_batches``) over which the
            optimizer warms its lr up, written into each group's ``warmup_steps`` at the start of training; ``None``
            keeps the optimizer's own ``warmup_steps``. Schedule-free methods need no decaying schedule, but do
            want a warm-up (Defazio et al. 2024 warm up over about 5% of the steps).
        bn_batches: how many of the most recent training batches to re-estimate BatchNorm statistics from at ``x``
            (0: keep the training statistics, which belong to ``y``). The schedule-free authors ask for this in
            BatchNorm networks; a few dozen batches suffice. The batches are kept as training saw them (after
            augmentation and device transfer), costing their memory; the module's forward is called on
            ``batch[0]`` (``torch.optim.swa_utils.update_bn``'s convention). Under DDP the statistics are pooled
            over the ranks.
        log_values: log the lr of each training step (``lr``, or ``lr/pg0``, ``lr/pg1``, ... with several groups),
            warm-up included, as :class:`~lightning_adamw.OneCycleWD` does.

    It costs one copy of the parameters while evaluating, and checkpoints hold the weights twice (``x`` and ``y``).
    Under DDP every rank switches its own replica (they hold the same weights, so nothing is communicated) and only
    the rank that writes the checkpoint computes ``x`` for it (all ranks, when BatchNorm statistics are pooled).
    Sharded strategies (FSDP, DeepSpeed) are refused. Weights-only checkpoints hold ``y``: Lightning does not call
    callbacks when it saves weights only. With ``bn_batches``, a switch to ``x`` before any training batch keeps
    the training BatchNorm statistics: quietly for sanity checks (their metrics are discarded), with a warning
    otherwise. The hooks decide when to switch; a :class:`WeightSwap` switches and keeps what it swapped out.

    Example::

        from lightning_adamw import OptimizerConfig
        from lightning_adamw.schedulefree import ScheduleFreeEval
        trainer = Trainer(max_epochs=30, callbacks=[ScheduleFreeEval(warmup=0.05, bn_batches=50)])
        # configure_optimizers: OptimizerConfig("schedulefree_adamw", lr=2.5e-3, weight_decay=0.05).build(self)
    """

    def __init__(self, warmup: float | None = None, bn_batches: int = 0, log_values: bool = True) -> None:
        super().__init__()
        if warmup is not None and not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the run's optimizer steps in [0, 1), got {warmup}.")
        if bn_batches < 0:
            raise ValueError(f"bn_batches is a number of training batches (0: off), got {bn_batches}.")
        self.warmup = warmup
        self.bn_batches = bn_batches
        self.log_values = log_values
        self._swap = WeightSwap(keep_bn=bn_batches > 0)
        self._recent: deque[Any] = deque(maxlen=bn_batches or None)
        self._x_bn: tuple[int, list[torch.Tensor]] | None = None  # (global step, statistics at x) of the last estimate
        self._warned_no_batches = False
        self._writes_checkpoints = True

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise MisconfigurationException(
                f"ScheduleFreeEval needs every rank to hold the full weights, but {type(trainer.strategy).__name__} "
                "shards them. Use strategy='ddp' (or a single device), or drop ScheduleFreeEval and call the "
                "optimizer's train()/eval() yourself."
            )
        self._swap.module, self._x_bn = pl_module, None
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

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_train(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.bn_batches:
            self._recent.append(batch)
        if self.log_values:
            groups = [g for o in self._swap.optimizers for g in o.param_groups]
            for i, group in enumerate(groups):
                pl_module.log(group_metric_name("lr", i, len(groups)), _step_lr(group), on_step=True, on_epoch=False)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            self._swap.forget_loaded()  # trainer.validate(ckpt_path=...): the module holds its x
        self._to_eval(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._to_train(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap.forget_loaded()
        self._to_eval(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap.forget_loaded()
        self._to_eval(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not on_train_end: a resumed fit with nothing left to train skips the training hooks
        self._to_eval(trainer)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._swap.holds_average:
            return  # the module holds x already (evaluating, or fit has ended)
        if self._writes_checkpoints or self._bn_collective(trainer):  # else this rank writes nothing
            self._schedule_free(trainer)
            self._swap.write_average(checkpoint["state_dict"], self._bn_update(trainer))

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning has just loaded the module weights: what was kept aside is stale
        self._swap.forget_kept()
        self._x_bn = None

    def state_dict(self) -> dict[str, Any]:
        return self._swap.state_dict() if self._writes_checkpoints else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._swap.load_state_dict(state_dict)

    # ---------------------------------------------------------------- helpers
    def _schedule_free(self, trainer: pl.Trainer) -> list[Optimizer]:
        self._swap.optimizers = [unwrap_optimizer(o) for o in trainer.optimizers if is_schedule_free(o)]
        return self._swap.optimizers

    def _to_train(self, trainer: pl.Trainer) -> None:
        self._schedule_free(trainer)
        self._swap.to_train()

    def _to_eval(self, trainer: pl.Trainer) -> None:
        self._schedule_free(trainer)
        self._swap.to_eval(self._bn_update(trainer))

    def _bn_update(self, trainer: pl.Trainer) -> Callable[[], bool] | None:
        return partial(self._update_bn, trainer) if self.bn_batches else None

    def _update_bn(self, trainer: pl.Trainer) -> bool:
        """Re-estimate the BatchNorm statistics for the weights now in the module; ``False``: kept (no batches)."""
        module = trainer.lightning_module
        if not self._recent:  # the sanity check of a fresh run has no batches yet, and its metrics are discarded
            if not self._warned_no_batches and not trainer.sanity_checking:
                self._warned_no_batches = True
                rank_zero_warn(
                    "ScheduleFreeEval(bn_batches=...) switches to the averaged weights before any training batch "
                    "was seen (a resumed fit with nothing left to train?): they keep the training BatchNorm "
                    "statistics. Evaluate after some training, or re-estimate with "
                    "lightning_adamw.schedulefree.update_bn(module, batches)."
                )
            return False
        buffers = _bn_buffers(module)
        if self._x_bn is not None and self._x_bn[0] == trainer.global_step:
            _copy_into(buffers, self._x_bn[1])  # x has not moved since the last estimate (a save after validating)
        else:
            update_bn(module, self._recent, trainer.strategy)
            self._x_bn = (trainer.global_step, [b.clone() for b in buffers])
        return True

    def _bn_collective(self, trainer: pl.Trainer) -> bool:
        # pooling BatchNorm statistics over ranks is a collective: then every rank computes x for a checkpoint
        return bool(self.bn_batches and self._recent and trainer.world_size > 1
                    and _batch_norms(trainer.lightning_module))

    def _set_warmup(self, trainer: pl.Trainer) -> None:
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise MisconfigurationException(
                "ScheduleFreeEval(warmup=...) is a fraction of the run, which has no end: set Trainer(max_epochs=...) "
                "or max_steps, or give the optimizer warmup_steps and drop warmup."
            )
        steps = round(self.warmup * int(total))
        for optimizer in self._swap.optimizers:
            if not all("warmup_steps" in group for group in optimizer.param_groups):
                raise MisconfigurationException(
                    f"ScheduleFreeEval(warmup={self.warmup}) sets the groups' warmup_steps, but "
                    f"{type(optimizer).__name__} has none: drop warmup and warm it up as that optimizer documents."
                )
            for group in optimizer.param_groups:
                group["warmup_steps"] = steps
