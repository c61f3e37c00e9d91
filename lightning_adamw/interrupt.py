"""``SaveOnInterrupt``: SIGTERM / SIGINT save a checkpoint at the next optimizer step and stop the run cleanly."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn


class RunInterrupted(SystemExit):
    """Raised after the interrupted run was saved; exits the process with status 0 (like Lightning's SIGTERM)."""


class SaveOnInterrupt(Callback):
    """Turns SIGTERM (a scheduler's pre-emption, ``kill``) and SIGINT (Ctrl-C) into a clean stop.

    The signal only raises a flag; at the end of the next training batch that completed an optimizer step (so no
    gradient-accumulation window is cut in half) the callback writes ``last.ckpt`` into the ModelCheckpoint folder
    and ends the run by raising :class:`RunInterrupted` (a ``SystemExit`` with status 0), so that no end-of-epoch
    hook marks the half-done epoch as finished. Continue with ``--ckpt_path last``; with a resumable dataloader
    (one with ``state_dict``/``load_state_dict``) the resumed run continues mid-epoch exactly where it stopped.
    Under DDP the ranks agree on the step before anyone stops. A second Ctrl-C while waiting interrupts at once.

    Args:
        signals: the signals to catch, by name.
        filename: the checkpoint's file name without extension; ``last`` is what ``--ckpt_path last`` finds.

    Example::

        Trainer(callbacks=[ModelCheckpoint(dirpath="runs/cifar10/ckpt", save_last=True), SaveOnInterrupt()])
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGINT"), filename: str = "last") -> None:
        super().__init__()
        self.signals = [self._signum(name) for name in signals]
        self.filename = filename
        self.requested: str | None = None
        self.saved_path: Path | None = None
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = 0
        self._at_epoch_end = False

    @staticmethod
    def _signum(name: str) -> signal.Signals:
        try:
            return signal.Signals[name]
        except KeyError:
            raise ValueError(f"Unknown signal {name!r}; use names such as 'SIGTERM' or 'SIGINT'.") from None

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = name
        rank_zero_info(f"{name} received: saving a checkpoint at the next optimizer step, then stopping.")

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requested, self._at_epoch_end = None, False
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("SaveOnInterrupt can only catch signals in the main thread; it is inactive here.")
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        """Where the interrupted run is saved: the ModelCheckpoint folder, else the trainer's root folder."""
        callback = trainer.checkpoint_callback
        folder = callback.dirpath if isinstance(callback, ModelCheckpoint) and callback.dirpath else None
        return Path(folder or trainer.default_root_dir) / f"{self.filename}.ckpt"

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside an accumulation window: no optimizer step yet
        requested = self.requested is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            self._at_epoch_end = True  # the epoch's last step: save once the epoch is closed, as checkpoints expect
            return
        self._save_and_exit(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._at_epoch_end:
            self._save_and_exit(trainer)

    def _save_and_exit(self, trainer: pl.Trainer) -> None:
        self.saved_path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(self.saved_path)
        message = (
            f"Stopped by {self.requested or 'a signal on another rank'} after step {trainer.global_step}; saved "
            f"{self.saved_path}. Continue with trainer.fit(model, ckpt_path={str(self.saved_path)!r}) (CLI: the same "
            "command plus --ckpt_path last)."
        )
        rank_zero_info(message)
        raise RunInterrupted(0)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
