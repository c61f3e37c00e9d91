"""``python -m lightning_adamw fit|validate|test|predict|lr_find|compare``: LightningCLI with the plugin loaded.

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
from typing import Any, Literal

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

import lightning_adamw  # noqa: F401  (registers OneCycleWD, FreezeUnfreeze and the schedules for short names)
from lightning_adamw.decay import DecoupledDecay
from lightning_adamw.lr_find import LRFindResult, lr_find
from lightning_adamw.onecycle import OneCycleWD
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


def _class_paths(node: Any) -> Iterator[str]:
    """Every ``class_path`` value in a loaded YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path" and isinstance(value, str):
                yield value
            else:
                yield from _class_paths(value)
    elif isinstance(node, list):
        for item in node:
            yield from _class_paths(item)


def zoo_names_without_zoo(argv: list[str]) -> list[tuple[str, str]]:
    """``(config, name)`` for each short ``class_path`` in the ``--config`` files of ``argv`` that only the zoo could
    resolve: names that are neither dotted paths nor classes of this plugin, Lightning's callbacks or its loggers."""
    import lightning.pytorch.callbacks as callbacks
    import lightning.pytorch.loggers as loggers
    import yaml

    configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    configs += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    known = set(dir(lightning_adamw)) | set(dir(callbacks)) | set(dir(loggers))
    found = []
    for config in configs:
        try:
            document = yaml.safe_load(Path(config).read_text())
        except (OSError, yaml.YAMLError):
            continue  # LightningCLI reports a missing or broken file itself
        found += [(config, name) for name in _class_paths(document) if "." not in name and name not in known]
    return found


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


class AdamWTrainer(Trainer):
    """Lightning's Trainer plus the ``lr_find`` subcommand."""

    def lr_find(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        min_lr: float = 1e-7,
        max_lr: float = 10.0,
        num_training: int = 100,
        mode: Literal["exponential", "linear"] = "exponential",
        early_stop_threshold: float | None = 4.0,
        plot_path: str | None = None,
    ) -> LRFindResult | None:
        """Learning-rate range test (Lightning's Tuner.lr_find, debiased): print the suggestions, save the plot.

        The suggestions are Lightning's steepest slope and fastai's ``valley`` (its default), ``minimum/10`` and
        ``steep`` (:mod:`lightning_adamw.lr_find`). Lightning's finder runs without the Trainer's callbacks;
        optimizers built in decoupled mode keep their weight decay, at the finder's lr.

        Args:
            min_lr: the smallest lr tried.
            max_lr: the largest lr tried.
            num_training: how many steps the test takes.
            mode: how the lr grows: ``exponential`` or ``linear``.
            early_stop_threshold: stop once the loss exceeds this multiple of the best loss (``None``: never).
            plot_path: where the PNG goes (default ``<default_root_dir>/lr_find.png``).
        """
        for callback in self.callbacks:
            if isinstance(callback, (OneCycleWD, DecoupledDecay)) and callback.weight_decay:
                rank_zero_warn(
                    f"{type(callback).__name__}(weight_decay={callback.weight_decay}) is not applied during lr_find: "
                    "Lightning's finder runs without the Trainer's callbacks. Give the decay to the optimizer "
                    "(OptimizerConfig(..., weight_decay=..., wd_mode='decoupled')) to keep it in the range test."
                )
        result = lr_find(self, model, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr,
                         num_training=num_training, mode=mode, early_stop_threshold=early_stop_threshold)
        if result is None:
            return None
        path = result.plot(Path(plot_path) if plot_path else Path(self.default_root_dir) / "lr_find.png")
        print(f"lr_find: suggested lrs ({len(result.lrs)} steps; plot saved to {path})\n{result.report()}")
        return result


def flat_hparams(node: Any, prefix: str = "") -> dict[str, Any]:
    """A parsed config as ``dotted.key -> number/str/bool`` (what TensorBoard's hparams tab can show)."""
    if isinstance(node, Namespace):
        node = vars(node)
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key.startswith("__"):
                continue
            out.update(flat_hparams(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if node is None or isinstance(node, (bool, int, float, str)):
        return {prefix: "null" if node is None else node}
    return {prefix: str(node)}


class LoggedConfigCallback(SaveConfigCallback):
    """Saves the run's config beside the logs (Lightning's behaviour) and logs it as hyperparameters."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(flat_hparams(self.config))


class AdamWCLI(LightningCLI):
    """LightningCLI that checks optimizer choices before anything is built, for a short error instead of a trace."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "lr_find": {"model", "datamodule"}}

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for key, node in _optimizer_configs(config):
            try:
                OptimizerConfig(**{k: node[k] for k in _OPTIMIZER_FIELDS})
            except (TypeError, ValueError) as err:
                self.parser.error(f"{key}: {err}")


def main(args: list[str] | None = None) -> Any:
    """Console entry point (``lightning-adamw`` and ``python -m lightning_adamw``).

    ``compare`` runs the comparison runner (:mod:`lightning_adamw.experiments.compare`); everything else goes to
    LightningCLI.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["compare"]:
        from lightning_adamw.experiments.compare import main as compare

        return compare(argv[1:])
    zoo_loaded = import_zoo() or any(package in sys.modules for package in ZOO_PACKAGES)
    if not zoo_loaded and (unresolved := zoo_names_without_zoo(argv)):
        config, name = unresolved[0]
        raise SystemExit(
            f"{config} names `{name}`, a class of this project's zoo (models/, datamodules/), by its short name, and "
            f"there is no zoo in {Path.cwd()}. Run the command from the root of the lightning_adamw checkout, or put "
            "the checkout on PYTHONPATH and give the full path (e.g. models.classifier.ImageClassifier)."
        )
    return AdamWCLI(
        LightningModule,
        LightningDataModule,
        trainer_class=AdamWTrainer,
        save_config_callback=LoggedConfigCallback,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Lightning with Adam done right. Also: `python -m lightning_adamw compare "
                       "--help`, the optimizer x seed comparison runner."},
        # optimizers come from the model's OptimizerConfig and schedules from OneCycleWD, not from CLI-level keys
        auto_configure_optimizers=False,
        args=args,
    )
