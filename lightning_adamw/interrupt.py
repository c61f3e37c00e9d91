"""``SaveOnInterrupt``: SIGTERM / SIGINT save a checkpoint at the next optimizer step and stop the run cleanly."""

from __future__ import annotations

import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_adamw.checkpoint import resume_paths


class RunInterrupted(SystemExit):
    """Raised after the interrupted run was saved; exits the process with status 0 (like Lightning's SIGTERM)."""


class SaveOnInterrupt(Callback):
    """Turns SIGTERM (a scheduler's pre-emption, ``kill``) and SIGINT (Ctrl-C) into a clean stop.

    The signal only raises a flag; at the end of the next training batch that completed an optimizer step (so no
    gradient-accumulation window is cut in half) the callback writes ``last.ckpt`` into the ModelCheckpoint folder
    and, once Lightning has logged that step, ends the run by raising :class:`RunInterrupted` (a ``SystemExit`` with
    status 0) at the start of the next batch, so that no end-of-epoch hook marks the half-done epoch as finished.
    The message says how to continue: ``--ckpt_path last`` (with :class:`~lightning_adamw.RunCheckpoint`, which
    finds the run again) or the checkpoint's path, and the same for ``trainer.fit(..., ckpt_path=...)``. With a
    resumable dataloader (one with ``state_dict``/``load_state_dict``, which Lightning saves in the checkpoint) the
    resumed run continues mid-epoch exactly where it stopped; resuming mid-epoch with any other loader says, in one
    line, that the rest of the epoch restarts from a first batch.
    Under DDP the ranks agree on the step before anyone stops. A second Ctrl-C while waiting interrupts at once.

    Args:
        signals: the signals to catch, by name.
        filename: the checkpoint's file name without extension; ``last`` is what ``--ckpt_path last`` finds.

    Example::

        Trainer(callbacks=[RunCheckpoint(monitor="val/acc", mode="max"), SaveOnInterrupt()])
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
        self._stop_message: str | None = None

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
        self.requested, self._at_epoch_end, self._stop_message = None, False, None
        self._say_how_the_epoch_resumes(trainer)
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("SaveOnInterrupt can only catch signals in the main thread; it is inactive here.")
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._exit_if_saved()
        self._step_at_batch_start = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_if_saved()

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
        self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._at_epoch_end and self._stop_message is None:
            self._save(trainer)

    @staticmethod
    def _say_how_the_epoch_resumes(trainer: pl.Trainer) -> None:
        done, total = trainer.fit_loop.epoch_loop.batch_progress.current.completed, trainer.num_training_batches
        if not trainer.fit_loop.restarted_mid_epoch or not 0 < done < total:
            return
        combined = trainer.fit_loop._combined_loader
        loaders = combined.flattened if combined is not None else []
        stateless = [type(dl).__name__ for dl in loaders if not callable(getattr(dl, "load_state_dict", None))]
        if stateless:
            rank_zero_warn(
                f"Resuming mid-epoch (epoch {trainer.current_epoch}, step {trainer.global_step}) with a training "
                f"loader without state_dict()/load_state_dict() ({stateless[0]}): the rest of this epoch restarts "
                "from the first batch of a new pass over the data, so some of its batches are seen twice and others "
                "not at all; a loader with that state resumes exactly."
            )
            # Lightning's own warning about this case, which says less
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def _save(self, trainer: pl.Trainer) -> None:
        # the run stops at the next batch or epoch start, after Lightning has logged this step (or epoch)
        self.saved_path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(self.saved_path)
        self._stop_message = (
            f"Stopped by {self.requested or 'a signal on another rank'} after step {trainer.global_step}; saved "
            f"{self.saved_path}. To continue, {resume_paths(trainer, self.saved_path)}."
        )

    def _exit_if_saved(self) -> None:
        if self._stop_message is not None:
            rank_zero_info(self._stop_message)
            raise RunInterrupted(0)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stop_message is not None:
            rank_zero_info(f"{self.requested or 'A signal'} arrived at the run's last step: it is complete "
                           f"(saved {self.saved_path}).")
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
