"""``python -m lightning_adamw fit|validate|test|predict --config X.yaml``: LightningCLI with the plugin loaded.

Run from a checkout of the project, the zoo packages ``models`` and ``datamodules`` in the current directory are
imported too, so configs can name their classes by short name (``class_path: WideResNet``).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lightning_adamw  # noqa: F401  (registers OneCycleWD, FreezeUnfreeze and the schedules for short names)

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


def main(args: list[str] | None = None) -> LightningCLI:
    """Console entry point (``lightning-adamw`` and ``python -m lightning_adamw``)."""
    import_zoo()
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
