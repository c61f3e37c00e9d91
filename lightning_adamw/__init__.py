"""lightning_adamw: Adam with decoupled weight decay and the 1cycle policy for PyTorch Lightning.

The plugin: an optimizer registry with weight decay as L2 or decoupled, the ``OneCycleWD`` callback (1cycle lr and
momentum plus decoupled weight decay for any optimizer), ``FreezeUnfreeze`` fine-tuning, and the ``LightningCLI``
entry point ``python -m lightning_adamw``.
Projects on the standalone ``pytorch_lightning`` package import the callbacks from
:mod:`lightning_adamw.pytorch_lightning`.
"""

import lightning_adamw._distributed  # noqa: F401  (destroys a gloo process group at exit; see the module)
from lightning_adamw.backbones import backbone_layer_groups
from lightning_adamw.checkpoint import RunCheckpoint
from lightning_adamw.decay import DecoupledDecay
from lightning_adamw.divergence import DivergenceError, DivergenceGuard
from lightning_adamw.finetuning import FreezeUnfreeze
from lightning_adamw.interrupt import RunInterrupted, SaveOnInterrupt
from lightning_adamw.lookahead import Lookahead
from lightning_adamw.muon import MuonAdamW, muon_split
from lightning_adamw.onecycle import OneCycleWD
from lightning_adamw.registry import (
    OptimizerConfig,
    OptimizerEntry,
    available_optimizers,
    build_optimizer,
    even_mults,
    get_optimizer_entry,
    param_groups,
    register_optimizer,
)
from lightning_adamw.schedulefree import ScheduleFreeEval
from lightning_adamw.schedules import Constant, OneCycle, OneCycle2018, OneCycleLM, Phase, Schedule

__all__ = [
    "Constant",
    "DecoupledDecay",
    "DivergenceError",
    "DivergenceGuard",
    "FreezeUnfreeze",
    "Lookahead",
    "MuonAdamW",
    "OneCycle",
    "OneCycle2018",
    "OneCycleLM",
    "OneCycleWD",
    "OptimizerConfig",
    "OptimizerEntry",
    "Phase",
    "RunCheckpoint",
    "RunInterrupted",
    "SaveOnInterrupt",
    "Schedule",
    "ScheduleFreeEval",
    "available_optimizers",
    "backbone_layer_groups",
    "build_optimizer",
    "even_mults",
    "get_optimizer_entry",
    "muon_split",
    "param_groups",
    "register_optimizer",
]
__version__ = "0.1.0"
