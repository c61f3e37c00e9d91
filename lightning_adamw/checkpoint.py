"""``RunCheckpoint``: a ModelCheckpoint whose ``last`` is the run's latest state and that ``ckpt_path="last"`` finds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (same arguments, ``save_last`` on by default) with two fixes for long runs.

    1. ``last.ckpt`` is the latest state: it is rewritten at every epoch's save point and at the end of training,
       also when the monitored metric did not improve (Lightning 2.6 rewrites it only when a top-k checkpoint was
       saved at that step, so ``last`` can be epochs old).
    2. ``ckpt_path="last"`` (``--ckpt_path last``) continues the latest run of the logger: with the checkpoints
       inside the logger's folder (no ``dirpath``) and no fixed logger ``version``, a new run would get a new
       ``version_N`` folder and find no last checkpoint there, so the newest ``<save_dir>/<name>/*/checkpoints/
       last.ckpt`` is taken and the logger continues in its folder (the same TensorBoard run, the same checkpoints).

    Example::

        Trainer(logger=TensorBoardLogger("runs", name="cifar10"), callbacks=[RunCheckpoint(monitor="val/acc",
                mode="max"), SaveOnInterrupt()])
        trainer.fit(model, datamodule, ckpt_path="last")  # the latest run of runs/cifar10, or a fresh start
    """

    def __init__(self, *args: Any, save_last: bool | None = True, **kwargs: Any) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_stale(trainer)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # last.ckpt belongs to this run (SaveOnInterrupt writes it too, and a resumed run continues it): overwrite
        # it rather than let Lightning's version counter start a last-v1.ckpt beside it
        if self.save_last:
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _save_last_if_stale(self, trainer: pl.Trainer) -> None:
        # skipped when something was already saved at this step (then last was written too), in fast_dev_run, in
        # the sanity check and outside fit
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        # Lightning's lookup for ckpt_path="last"; it runs before the logger's version folder is first used
        logger = trainer.loggers[0] if trainer.loggers else None
        if self.dirpath is None and logger is not None and getattr(logger, "_version", "") is None:
            latest = latest_last_checkpoint(Path(logger.save_dir or trainer.default_root_dir) / str(logger.name))
            if latest is not None:
                logger._version = latest.parent.parent.name  # continue in that run's folder
                rank_zero_info(f"ckpt_path='last': continuing {latest} (logging into {logger.log_dir}).")
        return super()._find_last_checkpoints(trainer)


def latest_last_checkpoint(root: Path) -> Path | None:
    """The newest ``last.ckpt`` (or ``last-vN.ckpt``) in ``root/*/checkpoints/``, the logger's version folders."""
    pattern = re.compile(rf"^{ModelCheckpoint.CHECKPOINT_NAME_LAST}(-v\d+)?\.ckpt$")
    found = [p for p in root.glob("*/checkpoints/*.ckpt") if pattern.match(p.name)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resume_paths(trainer: pl.Trainer, saved: Path) -> str:
    """How to continue from the checkpoint ``saved``: the CLI flag and the Python call that find it again."""
    # a plain ModelCheckpoint finds "last" only in a fixed dirpath, which cannot be told apart here from the
    # logger's folder of this run (a rerun gets a new version folder): it is given the exact path
    if isinstance(trainer.checkpoint_callback, RunCheckpoint):
        return (f"rerun the same command with --ckpt_path last (or --ckpt_path {saved}); in Python "
                f"trainer.fit(model, datamodule, ckpt_path='last') or ckpt_path='{saved}'")
    return (f"rerun the same command with --ckpt_path {saved}; in Python "
            f"trainer.fit(model, datamodule, ckpt_path='{saved}')")
