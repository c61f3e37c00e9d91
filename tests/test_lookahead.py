"""Lookahead against a hand-written loop of airbench94's rule, with BatchNorm statistics, and across a resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_adamw import Lookahead, OptimizerConfig
from tests._tiny import TinyRegression, loader, make_net


def reference(steps: int, every: int, decay: float, power: float, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """airbench94's loop: SGD; every ``every`` steps slow.lerp_(fast, 1 - d_t), fast <- slow; at the end a copy."""
    net = make_net(norm=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    slow = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [b for _ in range(steps) for b in loader(batch_size)][:steps]
    for t, (x, y) in enumerate(batches, start=1):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
        if t % every == 0 or t == steps:
            d = decay * (t / steps) ** power if t % every == 0 else 1.0
            for name, fast in net.state_dict().items():
                if fast.is_floating_point():
                    slow[name].lerp_(fast, 1 - d)
                    fast.copy_(slow[name])
    return net.state_dict()


def fit(tmp_path: Path, callbacks: list[pl.Callback], max_epochs: int = 2, ckpt_path: str | None = None,
        checkpoint: ModelCheckpoint | None = None) -> TinyRegression:
    model = TinyRegression(OptimizerConfig("sgd", lr=0.05, momentum=0.9), norm=True)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         enable_checkpointing=checkpoint is not None,
                         callbacks=[*callbacks, *([checkpoint] if checkpoint else [])])
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize(("every", "power"), [(5, 3.0), (3, 0.0), (4, 1.0)])
def test_lookahead_equals_airbench_rule(tmp_path: Path, every: int, power: float) -> None:
    # 2 epochs of 8 batches: 16 steps; every 5 leaves the last step off-sync (the final copy alone), every 4 on it
    model = fit(tmp_path, [Lookahead(every=every, decay=0.6, power=power)])
    expected = reference(16, every, 0.6, power)
    for name, value in model.net.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-12, msg=name)


def test_lookahead_changes_the_weights_and_the_batchnorm_statistics(tmp_path: Path) -> None:
    plain = fit(tmp_path / "plain", []).net.state_dict()
    averaged = fit(tmp_path / "lookahead", [Lookahead(every=2, decay=0.6, power=0.0)]).net.state_dict()
    assert not torch.allclose(plain["0.weight"], averaged["0.weight"])
    assert not torch.allclose(plain["1.running_mean"], averaged["1.running_mean"])
    assert torch.equal(plain["1.num_batches_tracked"], averaged["1.num_batches_tracked"])


def test_resume_from_a_checkpoint_continues_exactly(tmp_path: Path) -> None:
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                  save_on_train_epoch_end=True, filename="{epoch}")
    uninterrupted = fit(tmp_path / "full", [Lookahead(every=3, decay=0.6)], max_epochs=2, checkpoint=every_epoch)
    saved = tmp_path / "ckpt" / "epoch=0.ckpt"  # after step 8 of 16: slow and fast weights differ there
    checkpoint = torch.load(saved, weights_only=False)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("Lookahead"))
    assert not torch.equal(state["slow"]["net.0.weight"], checkpoint["state_dict"]["net.0.weight"])
    resumed = fit(tmp_path / "resumed", [Lookahead(every=3, decay=0.6)], max_epochs=2, ckpt_path=str(saved))
    for name, value in resumed.net.state_dict().items():
        torch.testing.assert_close(value, uninterrupted.net.state_dict()[name], rtol=0, atol=1e-12, msg=name)


def test_arguments_are_checked_and_an_endless_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every"):
        Lookahead(every=0)
    with pytest.raises(ValueError, match="decay"):
        Lookahead(decay=1.0)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=-1, max_steps=-1, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, callbacks=[Lookahead()])
    with pytest.raises(MisconfigurationException, match="no end"):
        trainer.fit(TinyRegression(), loader())
