"""The plugin's callbacks for projects on the standalone ``pytorch_lightning`` package.

``pytorch_lightning`` and ``lightning.pytorch`` ship the same code under two names, so their base classes differ: a
``pytorch_lightning`` Trainer and its LightningCLI (``issubclass(cls, pytorch_lightning.Callback)``) refuse the
``lightning.pytorch`` callbacks. Each class here is the plugin's callback with ``pytorch_lightning``'s base class
added: the same code, arguments and checkpoint state. Everything that is not a callback (optimizers, schedules) is
re-exported unchanged, so one import serves both packages' users.

Example::

    from lightning_adamw.pytorch_lightning import OneCycle2018, OneCycleWD, OptimizerConfig
    trainer = pytorch_lightning.Trainer(max_epochs=30, callbacks=[OneCycleWD(OneCycle2018(pct=0.075))])

    # LightningCLI YAML (pytorch_lightning.cli)
    trainer:
      callbacks:
        - class_path: lightning_adamw.pytorch_lightning.OneCycleWD
"""

from __future__ import annotations

import pytorch_lightning.callbacks as _callbacks

from lightning_adamw import decay, divergence, finetuning, interrupt, onecycle, schedulefree
from lightning_adamw.backbones import backbone_layer_groups
from lightning_adamw.divergence import DivergenceError
from lightning_adamw.interrupt import RunInterrupted
from lightning_adamw.registry import OptimizerConfig, build_optimizer, even_mults, param_groups, register_optimizer
from lightning_adamw.schedules import Constant, OneCycle, OneCycle2018, OneCycleLM, Phase, Schedule


class DecoupledDecay(decay.DecoupledDecay, _callbacks.Callback):
    __doc__ = decay.DecoupledDecay.__doc__


class DivergenceGuard(divergence.DivergenceGuard, _callbacks.Callback):
    __doc__ = divergence.DivergenceGuard.__doc__


class OneCycleWD(onecycle.OneCycleWD, _callbacks.Callback):
    __doc__ = onecycle.OneCycleWD.__doc__


class FreezeUnfreeze(finetuning.FreezeUnfreeze, _callbacks.BaseFinetuning):
    __doc__ = finetuning.FreezeUnfreeze.__doc__
    onecycle_class = OneCycleWD


class SaveOnInterrupt(interrupt.SaveOnInterrupt, _callbacks.Callback):
    __doc__ = interrupt.SaveOnInterrupt.__doc__


class ScheduleFreeEval(schedulefree.ScheduleFreeEval, _callbacks.Callback):
    __doc__ = schedulefree.ScheduleFreeEval.__doc__


__all__ = [
    "Constant",
    "DecoupledDecay",
    "DivergenceError",
    "DivergenceGuard",
    "FreezeUnfreeze",
    "OneCycle",
    "OneCycle2018",
    "OneCycleLM",
    "OneCycleWD",
    "OptimizerConfig",
    "Phase",
    "RunInterrupted",
    "SaveOnInterrupt",
    "Schedule",
    "ScheduleFreeEval",
    "backbone_layer_groups",
    "build_optimizer",
    "even_mults",
    "param_groups",
    "register_optimizer",
]
