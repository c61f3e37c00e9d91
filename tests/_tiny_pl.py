"""The tiny regression model of ``_tiny`` on the standalone ``pytorch_lightning`` package, for the port's tests."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from _tiny import loader, make_net
from torch import nn
from torch.utils.data import DataLoader

from lightning_adamw import OptimizerConfig


class TinyPLModel(pl.LightningModule):
    """MSE regression with two layer groups; the optimizer chosen by name (``OptimizerConfig``)."""

    def __init__(self, optimizer: OptimizerConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.net = make_net(seed)
        self.optimizer_config = optimizer or OptimizerConfig("adam")

    def layer_groups(self) -> list[nn.Module]:
        return [self.net[:-1], self.net[-1:]]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_config.build(self.layer_groups())


class TinyPLData(pl.LightningDataModule):
    """64 float64 regression samples, batches of 8 (8 steps per epoch)."""

    def train_dataloader(self) -> DataLoader:
        return loader(8)
