"""The Lightning package a trainer comes from: ``lightning.pytorch`` or the standalone ``pytorch_lightning``.

Both ship the same code under two names, so their classes differ: an ``isinstance`` check against one package's
strategy fails for the other's. Checks inside the plugin ask the trainer which package to compare with.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


def lightning_package(trainer: Any) -> ModuleType:
    """``pytorch_lightning`` when ``trainer`` is (a subclass of) its Trainer, else ``lightning.pytorch``."""
    if any(cls.__module__.split(".")[0] == "pytorch_lightning" for cls in type(trainer).__mro__):
        return importlib.import_module("pytorch_lightning")
    return importlib.import_module("lightning.pytorch")
