"""The plugin's callbacks for projects on the standalone ``pytorch_lightning`` package.

``pytorch_lightning`` and ``lightning.pytorch`` are the same code under two names, and their classes differ: a
``pytorch_lightning`` LightningCLI refuses a ``lightning.pytorch`` callback ("does not correspond to a subclass of
Callback"), and an ``isinstance`` check against one package's ModelCheckpoint or strategy fails for the other's.
Lightning publishes ``pytorch_lightning`` as a copy of ``lightning.pytorch`` with the imports renamed; this module
does the same for the plugin's callback modules when it is imported: each is loaded from its own source file with
``lightning.pytorch`` read as ``pytorch_lightning`` (line numbers and tracebacks unchanged). The classes are the
same code on ``pytorch_lightning``'s bases, with the same arguments and checkpoint state; the modules without
Lightning (optimizers, schedules, layer groups) are shared, not copied.

Example::

    from lightning_adamw.pytorch_lightning import OneCycle2018, OneCycleWD, OptimizerConfig
    trainer = pytorch_lightning.Trainer(max_epochs=30, callbacks=[OneCycleWD(OneCycle2018(pct=0.075))])

    # pytorch_lightning's LightningCLI, in the YAML:
    trainer:
      callbacks:
        - class_path: lightning_adamw.pytorch_lightning.OneCycleWD
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytorch_lightning  # noqa: F401  (fails here, naming the package, when it is not installed)

import lightning_adamw

# the Lightning-free part of the plugin, shared as it is (exported through __all__ below)
from lightning_adamw.backbones import backbone_layer_groups  # noqa: F401
from lightning_adamw.registry import (  # noqa: F401
    OptimizerConfig,
    build_optimizer,
    even_mults,
    param_groups,
    register_optimizer,
)
from lightning_adamw.schedules import Constant, OneCycle, OneCycle2018, OneCycleLM, Phase, Schedule  # noqa: F401

#: the plugin modules that import Lightning, in dependency order
PORTED_MODULES = ("decay", "schedulefree", "onecycle", "divergence", "checkpoint", "interrupt", "finetuning")
#: Lightning's mirror packages: lightning.pytorch is pytorch_lightning, lightning.fabric is lightning_fabric
_LIGHTNING_IMPORT = re.compile(r"^(\s*(?:from|import) )lightning\.(pytorch|fabric)\b", re.MULTILINE)
_MIRROR = {"pytorch": "pytorch_lightning", "fabric": "lightning_fabric"}
_SIBLING_IMPORT = re.compile(rf"^(\s*from lightning_adamw\.)({'|'.join(PORTED_MODULES)})\b", re.MULTILINE)


def _port(name: str) -> ModuleType:
    path = Path(__file__).with_name(f"{name}.py")
    source = _LIGHTNING_IMPORT.sub(lambda m: m[1] + _MIRROR[m[2]], path.read_text())
    source = _SIBLING_IMPORT.sub(rf"\1{__name__.rsplit('.', 1)[1]}.\2", source)
    spec = importlib.util.spec_from_loader(f"{__name__}.{name}", loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)  # inspect.getsource (jsonargparse's --help) and tracebacks read the original file
    sys.modules[spec.name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


decay, schedulefree, onecycle, divergence, checkpoint, interrupt, finetuning = (_port(name) for name in PORTED_MODULES)

DecoupledDecay = decay.DecoupledDecay
DivergenceError = divergence.DivergenceError
DivergenceGuard = divergence.DivergenceGuard
FreezeUnfreeze = finetuning.FreezeUnfreeze
OneCycleWD = onecycle.OneCycleWD
RunCheckpoint = checkpoint.RunCheckpoint
RunInterrupted = interrupt.RunInterrupted
SaveOnInterrupt = interrupt.SaveOnInterrupt
ScheduleFreeEval = schedulefree.ScheduleFreeEval

#: the package's public names that exist here, ported or shared (one list of them: ``lightning_adamw.__all__``)
__all__ = [name for name in lightning_adamw.__all__ if name in globals()]
