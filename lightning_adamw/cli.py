"""``python -m lightning_adamw fit|validate|test|predict|lr_find|compare``: LightningCLI with the plugin loaded.

Run from a checkout of the project, the zoo packages ``models`` and ``datamodules`` in the current directory are
imported too, so configs can name their classes by short name (``class_path: WideResNet``).

A user's mistake (a bad value, missing or broken data, a checkpoint that does not fit) is printed as the project's
message without a traceback and exits with status 1 (``LIGHTNING_ADAMW_TRACEBACK=1`` shows it); option names must be
given in full. Every run gets a ``DivergenceGuard`` (NaN/inf checks, at the steps the logger reads the loss) unless
its callbacks list one, so no checkpoint ever holds non-finite weights.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

import lightning_adamw  # noqa: F401  (registers OneCycleWD, FreezeUnfreeze and the schedules for short names)
from lightning_adamw._user_errors import (
    TRACEBACK_HINT,
    VERSION_KEY,
    CheckpointError,
    checkpoint_message,
    project_message,
    short_parser_message,
    show_traceback,
)
from lightning_adamw.decay import DecoupledDecay
from lightning_adamw.divergence import DivergenceGuard
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


def _optimizer_values(config: Namespace) -> dict[str, dict[str, Any]]:
    """The model's OptimizerConfig namespaces as plain values, by dotted key."""
    def plain(value: Any) -> Any:
        return plain(value.as_dict()) if isinstance(value, Namespace) else list(value) if isinstance(
            value, tuple) else value

    return {f"model.{key}": {k: plain(node[k]) for k in sorted(_OPTIMIZER_FIELDS)}
            for key, node in _optimizer_configs(config.get("model"))}


def source_roots() -> list[Path]:
    """The folders of this project's code: the plugin and the zoo packages that are imported."""
    roots = [Path(lightning_adamw.__file__).resolve().parent]
    for package in ZOO_PACKAGES:
        module = sys.modules.get(package)
        roots += [Path(p).resolve() for p in getattr(module, "__path__", [])]
    return roots


class AdamWTrainer(Trainer):
    """Lightning's Trainer plus the ``lr_find`` subcommand; a checkpoint that cannot be restored is named.

    ``fit`` that trains no optimizer step (``max_steps=0``, ``limit_train_batches=0``, a training set smaller than one
    batch with ``drop_last``, ...) is an error naming the settings, not a silent success.
    """

    def _restoring(self, run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``run(*args, **kwargs)``, with a failure to restore its ``ckpt_path`` named as a :class:`CheckpointError`."""
        try:
            return run(*args, **kwargs)
        except Exception as err:
            ckpt_path = self.ckpt_path or kwargs.get("ckpt_path")
            message = checkpoint_message(err, ckpt_path, source_roots(), lightning_adamw.__version__)
            if message is None:
                raise
            raise CheckpointError(message) from err

    # wraps: LightningCLI builds each subcommand's options (ckpt_path, ...) from Trainer's signature, kept this way
    @functools.wraps(Trainer.fit)
    def fit(self, *args: Any, **kwargs: Any) -> None:
        self._restoring(super().fit, *args, **kwargs)
        tuning = any(isinstance(c, (LearningRateFinder, BatchSizeFinder)) for c in self.callbacks)  # Tuner's own fit
        # ddp_spawn trains in child processes: this process's loops never ran, so its global_step says nothing
        spawned = isinstance(getattr(self.strategy, "launcher", None), _MultiProcessingLauncher)
        if self.state.status == TrainerStatus.FINISHED and self.global_step == 0 and not tuning and not spawned:
            settings = [f"trainer.{name}={value}" for name, value in (
                ("max_steps", self.max_steps), ("max_epochs", self.max_epochs),
                ("limit_train_batches", self.limit_train_batches)) if value == 0]
            why = " and ".join(settings) or (
                f"the training dataloader yields {self.num_training_batches} batches (a dataset smaller than one "
                "batch with drop_last, or empty)"
            )
            raise ValueError(
                f"fit trained no optimizer step: {why}. Give the run at least one training batch, or use the "
                "`validate` subcommand to evaluate without training."
            )

    @functools.wraps(Trainer.validate)
    def validate(self, *args: Any, **kwargs: Any) -> Any:
        return self._restoring(super().validate, *args, **kwargs)

    @functools.wraps(Trainer.test)
    def test(self, *args: Any, **kwargs: Any) -> Any:
        return self._restoring(super().test, *args, **kwargs)

    @functools.wraps(Trainer.predict)
    def predict(self, *args: Any, **kwargs: Any) -> Any:
        return self._restoring(super().predict, *args, **kwargs)

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
    """Saves the run's config beside the logs (Lightning's behaviour) and logs it as hyperparameters; checkpoints
    record the lightning_adamw version that wrote them, for the message when one cannot be restored."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(flat_hparams(self.config))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[VERSION_KEY] = lightning_adamw.__version__


class AdamWArgumentParser(LightningArgumentParser):
    """Lightning's parser without abbreviated options, whose errors are one or two lines instead of the usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_epoch` is a typo, not `--trainer.max_epochs`
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or show_traceback():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [o for action in parser._actions for o in action.option_strings]
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {short_parser_message(message, options)}\n(`{prog} --help` lists the options)\n")
        raise SystemExit(2)


class AdamWCLI(LightningCLI):
    """LightningCLI that checks optimizer choices before anything is built, for a short error instead of a trace."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "lr_find": {"model", "datamodule"}}

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here, before anything is built: name a bad file here too
        subcommand = self.config.get("subcommand")
        asked = _optimizer_values(self.config[subcommand]) if subcommand == "fit" else {}
        try:
            super()._parse_ckpt_path()
        except Exception as err:
            config = self.config[subcommand] if subcommand else self.config
            message = checkpoint_message(err, config.get("ckpt_path"), source_roots(), lightning_adamw.__version__,
                                         step="resume_start")
            if message is None:
                raise
            raise CheckpointError(message) from err
        # LightningCLI replaced the model's arguments by the checkpoint's saved hyperparameters; a resumed fit
        # continues the checkpoint's optimizer and its state, so another optimizer on the command line is
        # refused rather than silently dropped
        saved = _optimizer_values(self.config[subcommand]) if subcommand == "fit" else {}
        self._refuse_changes(self.config[subcommand].get("ckpt_path") if subcommand else None, asked, saved)

    def _refuse_changes(self, ckpt_path: str | None, asked: dict[str, dict[str, Any]],
                        saved: dict[str, dict[str, Any]]) -> None:
        for key, wanted in asked.items():
            changes = [f"{k}: {saved[key][k]!r} -> {v!r}" for k, v in wanted.items()
                       if key in saved and k in saved[key] and saved[key][k] != v]
            if changes:
                self.parser.error(
                    f"--ckpt_path {ckpt_path} was trained with another optimizer than this command's {key} "
                    f"({'; '.join(changes)}). Resuming continues the checkpoint's optimizer and its state: drop the "
                    "change to resume, or start a new run without --ckpt_path."
                )

    def before_fit(self) -> None:
        # ``--ckpt_path last`` is found only now that the trainer exists, and LightningCLI applies no saved
        # hyperparameters for it: compare the model's optimizer with the one saved in that checkpoint
        if self.config.fit.get("ckpt_path") != "last":
            return
        found = {p for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                 for p in cb._find_last_checkpoints(self.trainer)}
        if not found:
            return
        path = max(found, key=lambda p: Path(p).stat().st_mtime)
        hparams = torch.load(path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        asked = _optimizer_values(self.config.fit)
        saved = {key: hparams[key.rsplit(".", 1)[-1]] for key in asked
                 if isinstance(hparams.get(key.rsplit(".", 1)[-1]), dict)}
        self._refuse_changes(path, asked, saved)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, DivergenceGuard) for c in trainer.callbacks):
            # NaN/inf only (no loss-ratio stop the config did not ask for), read at the logger's steps: no extra sync
            trainer.callbacks.insert(0, DivergenceGuard(max_ratio=None,
                                                        check_every_n_steps=max(1, trainer.log_every_n_steps)))
        return trainer

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
    try:
        return AdamWCLI(
            LightningModule,
            LightningDataModule,
            trainer_class=AdamWTrainer,
            parser_class=AdamWArgumentParser,
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
    except Exception as err:
        message = None if show_traceback() else project_message(err, source_roots())
        if message is None:
            raise
        raise SystemExit(f"error: {message}\n{TRACEBACK_HINT}") from None
