"""DivergenceGuard: a diverging run stops with a useful message and leaves only finite checkpoints behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny import TinyRegression, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_adamw import OptimizerConfig
from lightning_adamw.divergence import DivergenceError, DivergenceGuard


class Blowup(TinyRegression):
    """The loss turns NaN (or huge) from a given step on."""

    def __init__(self, at: int, value: float) -> None:
        super().__init__(OptimizerConfig("adam", lr=1e-3))
        self.at, self.value = at, value

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * self.value if self.global_step >= self.at else loss


def test_nan_loss_stops_with_step_lr_and_advice(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    tr = trainer(max_epochs=3, enable_checkpointing=True, callbacks=[DivergenceGuard(), checkpoints])
    with pytest.raises(DivergenceError, match=r"loss is nan at step 11 \(epoch 1, lr 0.001\).*lower maximum lr"):
        tr.fit(Blowup(at=11, value=float("nan")), loader())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 8  # the epoch-0 checkpoint, finite, is what remains
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_loss_far_above_its_start_stops() -> None:
    tr = trainer(max_epochs=2, callbacks=[DivergenceGuard(max_ratio=10, warmup_steps=4)])
    with pytest.raises(DivergenceError, match="diverged: .* at step 6 .* more than 10x its starting value"):
        tr.fit(Blowup(at=6, value=1e4), loader())


def test_only_non_finite_when_no_ratio() -> None:
    # a loss 1e6 times its start is finite: without max_ratio the guard lets the run finish
    tr = trainer(max_epochs=1, callbacks=[DivergenceGuard(max_ratio=None, warmup_steps=2)])
    tr.fit(Blowup(at=4, value=1e6), loader())
    assert tr.state.finished and not tr.should_stop and tr.global_step == tr.num_training_batches
    with pytest.raises(DivergenceError, match="at step 4"):  # the same run with the ratio check stops there
        trainer(max_epochs=1, callbacks=[DivergenceGuard(max_ratio=10, warmup_steps=2)]).fit(
            Blowup(at=4, value=1e6), loader())


def test_refuses_to_save_non_finite_weights(tmp_path: Path) -> None:
    model = TinyRegression()
    tr = trainer(max_steps=1, callbacks=[DivergenceGuard()])
    tr.fit(model, loader())
    with torch.no_grad():
        model.net[0].weight[0, 0] = float("inf")
    with pytest.raises(DivergenceError, match=r"Refusing to save.*\['net.0.weight'\]"):
        tr.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


@pytest.mark.parametrize("kwargs", [dict(max_ratio=0.5), dict(warmup_steps=0), dict(check_every_n_steps=0)])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DivergenceGuard(**kwargs)
