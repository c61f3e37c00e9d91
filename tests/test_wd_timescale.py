"""``OneCycleWD(weight_decay_timescale=...)``: wd = 1 / (max_lr * tau_epochs * steps_per_epoch), Wang & Aitchison."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from _tiny import TinyRegression, loader, make_net, oracle_loop, trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_onecycle_oracle import assert_same_weights

from lightning_adamw import Constant, OneCycleWD, OptimizerConfig


def logged(log_dir: Path, name: str) -> list[float]:
    with open(next(log_dir.rglob("metrics.csv"))) as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def test_timescale_sets_adamw_weight_decay(tmp_path: Path) -> None:
    """64 samples, batch 8: 8 steps per epoch; tau 2 epochs at lr 3e-3 is wd 1 / (3e-3 * 2 * 8) = 20.83."""
    lr, tau, epochs = 3e-3, 2.0, 3
    wd = 1.0 / (lr * tau * 8)
    model = TinyRegression(OptimizerConfig("adam", lr=lr, betas=(0.9, 0.99), weight_decay=0.0, wd_mode="decoupled"))
    trainer(max_epochs=epochs, callbacks=[OneCycleWD(Constant(), weight_decay_timescale=tau)],
            logger=CSVLogger(tmp_path), log_every_n_steps=1).fit(model, loader())
    net = make_net()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=wd)
    oracle_loop(net, opt, None, epochs)
    assert_same_weights(model, net)
    assert logged(tmp_path, "weight_decay") == [pytest.approx(wd, rel=1e-12)]
    assert logged(tmp_path, "wd") == [pytest.approx(1 / (tau * 8), rel=1e-12)] * (epochs * 8)  # lr_t * wd per step


@pytest.mark.parametrize("convention, peak", [("lr", 1e-2), ("schedule", 1.0)])
def test_timescale_counts_optimizer_steps_per_epoch(convention: str, peak: float, tmp_path: Path) -> None:
    """Batch 16 with 2 batches accumulated: 64 / 16 / 2 = 2 optimizer steps per epoch."""
    model = TinyRegression(lambda params: torch.optim.Adam(params, lr=1e-2))
    callback = OneCycleWD(weight_decay_timescale=3.0, wd_convention=convention)
    trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[callback], logger=CSVLogger(tmp_path)).fit(
        model, loader(batch_size=16))
    assert logged(tmp_path, "weight_decay") == [pytest.approx(1.0 / (peak * 3.0 * 2), rel=1e-12)]


def test_timescale_refuses_an_explicit_weight_decay() -> None:
    with pytest.raises(ValueError, match="drop weight_decay"):
        OneCycleWD(weight_decay=0.1, weight_decay_timescale=5)
    with pytest.raises(ValueError, match="drop normalized=True"):
        OneCycleWD(normalized=True, weight_decay_timescale=5)
    with pytest.raises(ValueError, match="positive number of epochs"):
        OneCycleWD(weight_decay_timescale=0)
    model = TinyRegression(OptimizerConfig("adam", lr=3e-3, weight_decay=0.1, wd_mode="decoupled"))
    with pytest.raises(MisconfigurationException, match="already carries weight decay 0.1.*set that to 0"):
        trainer(max_epochs=1, callbacks=[OneCycleWD(weight_decay_timescale=5)]).fit(model, loader())
