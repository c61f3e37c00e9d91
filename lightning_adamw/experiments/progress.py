"""``RunProgress``: the callback the comparison runner adds to each run's config."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

ELAPSED = "compare/elapsed_s"
EPOCH = "compare/epoch"


class RunProgress(Callback):
    """Prints the comparison's progress every epoch, logs the wall time of each validation, marks a finished run.

    At every validation (not the sanity check) it logs ``compare/elapsed_s``, the seconds since the trainer's
    ``setup`` summed over every session of a resumed run, and ``compare/epoch``, the training epochs done
    (fractional inside an epoch), at the step of the validation metrics, so the runner sees when a run reached a
    target.

    Args:
        label: the run's name in the comparison (``adamw seed 1``).
        index: the run's number, from 1.
        total: how many runs the comparison has.
        finished_file: written when training ends normally (not on an interruption or an error).
    """

    def __init__(self, label: str = "", index: int = 1, total: int = 1, finished_file: str | None = None) -> None:
        super().__init__()
        self.label, self.index, self.total, self.finished_file = label, index, total, finished_file
        self._start = time.perf_counter()
        self._before = 0.0  # seconds spent in earlier sessions of a resumed run

    def elapsed(self) -> float:
        return self._before + time.perf_counter() - self._start

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            of = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
            print(f"[compare {self.index}/{self.total} | {self.label}] epoch {trainer.current_epoch + 1}/{of}",
                  flush=True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # epochs done, fractional for a validation inside an epoch (val_check_interval < 1); an end-of-epoch
        # validation runs before current_epoch advances
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        per_epoch = trainer.num_training_batches
        fraction = batches / per_epoch if per_epoch and per_epoch != float("inf") else 0.0
        pl_module.log(ELAPSED, self.elapsed(), on_epoch=True)
        pl_module.log(EPOCH, trainer.current_epoch + fraction, on_epoch=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.finished_file and trainer.is_global_zero:
            Path(self.finished_file).write_text(json.dumps({"global_step": trainer.global_step}))

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._before = float(state_dict.get("elapsed_s", 0.0))
