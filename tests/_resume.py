"""Helpers of the CLI resume tests: callbacks that interrupt a run by a real signal (``--trainer.callbacks+=
_resume.SignalAt``) and a tiny model that logs the metric the vision configs monitor."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import lightning.pytorch as pl
import torch
from _tiny import TinyCLIModel, three_group_net
from torch import nn

from lightning_adamw import OptimizerConfig


class Announce(pl.Callback):
    """Prints each finished optimizer step for the parent process and, from ``slow_from`` on, slows down so that a
    signal sent at a printed step lands mid-epoch, a few steps later."""

    def __init__(self, slow_from: int = 0, pause: float = 0.3) -> None:
        self.slow_from = slow_from
        self.pause = pause

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        print(f"STEP {trainer.global_step}", flush=True)
        if trainer.global_step >= self.slow_from:
            time.sleep(self.pause)


class SignalAt(pl.Callback):
    """Sends the signal ``name`` to its own process at the end of optimizer step ``step`` (an in-process CLI kill)."""

    def __init__(self, step: int, name: str = "SIGTERM") -> None:
        self.step = step
        self.name = name

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.Signals[self.name])


class ScoredModel(TinyCLIModel):
    """TinyCLIModel that logs ``val/acc`` and ``val/acc_tta`` (the vision configs' monitored keys): ``scores[epoch]``
    when given (a run whose metric falls at the end), else minus the validation loss."""

    def __init__(self, optimizer: OptimizerConfig | None = None, scores: list[float] | None = None) -> None:
        super().__init__(optimizer)
        self.save_hyperparameters()  # as the zoo's models do: LightningCLI reads them back from a checkpoint
        self.scores = scores

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        score = torch.tensor(self.scores[self.current_epoch]) if self.scores else -loss
        self.log_dict({"val/loss": loss, "val/acc": score, "val/acc_tta": score})


class ThreeGroupModel(ScoredModel):
    """ScoredModel with three layer groups (Linear+BatchNorm, Linear, head), as the Cars ResNet-50's three."""

    def __init__(self, optimizer: OptimizerConfig | None = None, scores: list[float] | None = None) -> None:
        super().__init__(optimizer, scores)
        self.net = three_group_net()

    def layer_groups(self) -> list[nn.Module]:
        return list(self.net)


class Trainable(pl.Callback):
    """Records, at every training batch, whether each body group's parameters train and its BatchNorm mode."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[bool, bool]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        body = pl_module.layer_groups()[:-1]
        self.seen[trainer.global_step] = (all(p.requires_grad for g in body for p in g.parameters()),
                                          pl_module.net[0][1].training)
