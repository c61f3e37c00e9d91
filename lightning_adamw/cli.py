"""``python -m lightning_adamw fit|validate|test|predict --config X.yaml``: LightningCLI with the plugin loaded.

Run from a checkout of the project, the zoo packages ``models`` and ``datamodules`` in the current directory are
imported too, so configs can name their classes by short name (``class_path: WideResNet``).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lightning_adamw  # noqa: F401  (registers OneCycleWD, FreezeUnfreeze and the schedules for short names)
from lightning_adamw.registry import OptimizerConfig

ZOO_PACKAGES = ("models", "datamodules")


def import_zoo(root: Path | None = None) -> list[str]:
    """Import every module of the zoo packages found in ``root`` (default: the current directory).

    Returns the imported module names. LightningCLI resolves short class names among imported subclasses.
    """
    root = Path.cwd() if root is None else root
    found = [name for name in ZOO_PACKAGES if (root / name / "__init__.py").is_file()]
    if found and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    imported = []
    for package in found:
        importlib.import_module(package)
        for info in pkgutil.iter_modules([str(root / package)]):
            imported.append(importlib.import_module(f"{package}.{info.name}").__name__)
    return imported


def _optimizer_configs(node: Any, path: str = "") -> Iterator[tuple[str, Namespace]]:
    """Every namespace in a parsed config shaped like an OptimizerConfig, with its dotted key."""
    if isinstance(node, Namespace):
        children = vars(node)
        if _OPTIMIZER_FIELDS <= set(children):
            yield path, node
            return
        for key, child in children.items():
            yield from _optimizer_configs(child, f"{path}.{key}" if path else key)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from _optimizer_configs(item, f"{path}[{i}]")


_OPTIMIZER_FIELDS = {f.name for f in fields(OptimizerConfig)}


class AdamWCLI(LightningCLI):
    """LightningCLI that checks optimizer choices before anything is built, for a short error instead of a trace."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for key, node in _optimizer_configs(config):
            try:
                OptimizerConfig(**{k: node[k] for k in _OPTIMIZER_FIELDS})
            except (TypeError, ValueError) as err:
                self.parser.error(f"{key}: {err}")


def main(args: list[str] | None = None) -> LightningCLI:
    """Console entry point (``lightning-adamw`` and ``python -m lightning_adamw``)."""
    import_zoo()
    return AdamWCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # optimizers come from the model's OptimizerConfig and schedules from OneCycleWD, not from CLI-level keys
        auto_configure_optimizers=False,
        args=args,
    )
