"""Tiny float64 models and a recorder shared by the plugin tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import OptimizerConfig


def regression_data(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(8, 1, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(n, 1, generator=gen,
                                                                                      dtype=torch.float64)
    return TensorDataset(x, y)


def make_net(seed: int = 0, norm: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, 16)]
    if norm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 1)]
    return nn.Sequential(*layers).double()


def three_group_net(seed: int = 0) -> nn.Sequential:
    """Linear+BatchNorm, Linear, head: three layer groups, as the Cars ResNet-50's (body, body, head)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh()),
        nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
        nn.Linear(16, 1),
    ).double()


def loader(batch_size: int = 8, n: int = 64) -> DataLoader:
    return DataLoader(regression_data(n), batch_size=batch_size, shuffle=False)


class TinyRegression(pl.LightningModule):
    """MSE regression; the optimizer comes from a factory (registry config or plain torch)."""

    def __init__(self, optimizer: OptimizerConfig | Callable[[Any], torch.optim.Optimizer] | None = None,
                 norm: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.net = make_net(seed, norm)
        self.optimizer_factory = optimizer or OptimizerConfig("adam")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def layer_groups(self) -> list[nn.Module]:
        return [self.net[:-1], self.net[-1:]]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if isinstance(self.optimizer_factory, OptimizerConfig):
            return self.optimizer_factory.build(self.net)
        return self.optimizer_factory(self.net.parameters())


class Recorder(Callback):
    """Records lr / momentum of every group as they are at the optimizer step, via a step post-hook."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.momenta: list[list[float | None]] = []
        self.steps: list[int] = []
        self._handle: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.steps.append(trainer.global_step)
            self.lrs.append([g["lr"] for g in opt.param_groups])
            self.momenta.append([g["betas"][0] if "betas" in g else g.get("momentum") for g in opt.param_groups])

        self._handle = optimizer.register_step_post_hook(hook)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._handle.remove()


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def oracle_loop(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    epochs: int,
    batch_size: int = 8,
    before_step: Callable[[int], None] | None = None,
) -> None:
    """The plain PyTorch loop the Lightning runs are compared with."""
    step = 0
    for _ in range(epochs):
        for x, y in loader(batch_size):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.mse_loss(net(x), y).backward()
            if before_step is not None:
                before_step(step)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1


class TinyCLIModel(TinyRegression):
    """A LightningCLI-friendly tiny model: the optimizer chosen by name in the config."""

    def __init__(self, optimizer: OptimizerConfig | None = None) -> None:
        super().__init__(optimizer)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory.build(self.layer_groups())


class TinyData(pl.LightningDataModule):
    """64 float64 regression samples, batches of 8."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return loader(self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return loader(self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return loader(self.batch_size)


class ShardedData(TinyData):
    """Each rank takes every world_size-th sample, unshuffled (Lightning's own sampler would shuffle under DDP)."""

    def train_dataloader(self) -> DataLoader:
        from torch.utils.data.distributed import DistributedSampler

        data = regression_data()
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                     shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


class ResumableLoader(DataLoader):
    """An unshuffled DataLoader that Lightning can resume mid-epoch (it has ``state_dict`` / ``load_state_dict``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        self._served = skip
        for i, batch in enumerate(super().__iter__()):
            if i < skip:
                continue
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["served"]


class TinyEvalModel(TinyCLIModel):
    """TinyCLIModel with a test step, for the comparison runner."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test/loss", nn.functional.mse_loss(self(x), y))


class TinyResumableData(TinyData):
    """TinyData whose training loader resumes mid-epoch."""

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(regression_data(), batch_size=self.batch_size)
