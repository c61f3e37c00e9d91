"""The callback in a LightningModule that knows nothing of this project (Lightning's BoringModel)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny import trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_adamw import OneCycleWD


def test_plain_module_trains_and_logs_to_tensorboard(tmp_path: Path) -> None:
    class Plain(BoringModel):
        def configure_optimizers(self) -> torch.optim.Optimizer:  # BoringModel's own adds a StepLR
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Plain()
    before = [p.detach().clone() for p in model.parameters()]
    logger = TensorBoardLogger(tmp_path, name="plain")
    trainer(max_epochs=2, limit_train_batches=10, logger=logger, log_every_n_steps=1,
            callbacks=[OneCycleWD(weight_decay=1e-2)]).fit(model)
    assert any(not (a == b.detach()).all() for a, b in zip(before, model.parameters()))
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lr", "momentum", "wd"} <= tags
    lr = [e.value for e in events.Scalars("lr")]
    assert [e.step for e in events.Scalars("lr")] == list(range(20))
    assert lr[0] == pytest.approx(0.1 / 25) and max(lr) == pytest.approx(0.1, rel=1e-2)
    wd = [e.value for e in events.Scalars("wd")]
    assert wd == pytest.approx([x * 1e-2 for x in lr], rel=1e-6)
