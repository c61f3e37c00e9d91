"""FreezeUnfreeze with OneCycleWD: frozen body (BatchNorm in eval), then a fresh cycle with discriminative lrs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _tiny import Recorder, TinyRegression, loader, three_group_net, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_adamw import FreezeUnfreeze, OneCycle2018, OneCycleWD, OptimizerConfig

HEAD_LR, LRS = 1e-2, [1e-3 / 9, 1e-3 / 3, 1e-3]  # the Cars recipe's shape, scaled down
UNFREEZE, EPOCHS, STEPS_PER_EPOCH = 2, 5, 8


class ThreeGroups(TinyRegression):
    """Linear+BN, Linear, head: three layer groups, the optimizer over all of them."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(OptimizerConfig("adamw", lr=HEAD_LR, weight_decay=0.1), seed=seed)
        self.net = three_group_net(seed)

    def layer_groups(self) -> list[nn.Module]:
        return list(self.net)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory.build(self.layer_groups())


class Watch(pl.Callback):
    """Records body parameters, BatchNorm state and mode while training."""

    def __init__(self) -> None:
        self.bn_training: dict[int, bool] = {}
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.bn_training[trainer.global_step] = pl_module.net[0][1].training

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.snapshots[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def fit(tmp_path: Path, name: str, ckpt_path: str | None = None, seed: int = 0):
    model, recorder, watch = ThreeGroups(seed), Recorder(), Watch()
    callbacks = [OneCycleWD(OneCycle2018(pct=0.1)), FreezeUnfreeze(unfreeze_at_epoch=UNFREEZE, lrs=LRS), recorder,
                 watch, ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, every_n_epochs=1)]
    tr = trainer(max_epochs=EPOCHS, callbacks=callbacks, enable_checkpointing=True, limit_val_batches=None,
                 num_sanity_val_steps=2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    tr.fit(model, loader(), loader(), ckpt_path=ckpt_path)
    return model, recorder, watch, initial


def test_freeze_then_unfreeze_with_a_fresh_cycle(tmp_path: Path) -> None:
    model, recorder, watch, initial = fit(tmp_path, "run")
    frozen_epoch = watch.snapshots[UNFREEZE - 1]
    for key in ("net.0.0.weight", "net.0.1.weight", "net.0.1.running_mean", "net.0.1.running_var", "net.1.0.weight"):
        assert torch.equal(frozen_epoch[key], initial[key]), f"{key} changed while frozen"
    assert not torch.equal(frozen_epoch["net.2.weight"], initial["net.2.weight"])  # the head trained
    # BatchNorm of the frozen body is in eval mode, also after the sanity check and the validation loops
    first = UNFREEZE * STEPS_PER_EPOCH
    assert not any(watch.bn_training[s] for s in range(first))
    assert all(watch.bn_training[s] for s in range(first, EPOCHS * STEPS_PER_EPOCH))
    final = model.state_dict()
    assert not torch.equal(final["net.0.0.weight"], initial["net.0.0.weight"])
    assert not torch.equal(final["net.0.1.running_mean"], initial["net.0.1.running_mean"])

    # lrs: cycle 1 over the frozen epochs at the head lr, then a fresh cycle from max/div with discriminative peaks
    schedule = OneCycle2018(pct=0.1)
    total = EPOCHS * STEPS_PER_EPOCH
    for step, lrs in zip(recorder.steps, recorder.lrs):
        if step < first:
            assert lrs == pytest.approx([HEAD_LR * schedule(step, first)[0]] * 3, rel=1e-12)
        else:
            mult = schedule(step - first, total - first)[0]
            assert lrs == pytest.approx([lr * mult for lr in LRS], rel=1e-12)
    assert recorder.lrs[first] == pytest.approx([lr / 10 for lr in LRS])  # the fresh cycle starts at max/div
    assert recorder.momenta[first] == pytest.approx([0.95] * 3)


class OptimizerStateAtUnfreeze(pl.Callback):
    """The optimizer state of the head's weight seen just before the first step after the unfreeze, and at the end."""

    def __init__(self) -> None:
        self.at_unfreeze: dict[str, Any] | None = None
        self.final_steps: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == UNFREEZE * STEPS_PER_EPOCH:
            self.at_unfreeze = {k: v.clone() for k, v in optimizer.state[pl_module.net[2].weight].items()}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        self.final_steps = [float(optimizer.state[p]["step"]) for p in pl_module.parameters()]


@pytest.mark.parametrize("reset", [None, False])
def test_the_unfreeze_starts_a_fresh_optimizer_as_the_study(reset: bool | None) -> None:
    # fastai 0.7 built a new Adam at the unfreeze: no moments or step count carried over from the head-only phase
    watch = OptimizerStateAtUnfreeze()
    unfreeze = FreezeUnfreeze(UNFREEZE, lrs=LRS) if reset is None else FreezeUnfreeze(UNFREEZE, lrs=LRS,
                                                                                       reset_optimizer_state=reset)
    tr = trainer(max_epochs=EPOCHS, callbacks=[OneCycleWD(OneCycle2018(pct=0.1)), unfreeze, watch])
    tr.fit(ThreeGroups(), loader())
    after = (EPOCHS - UNFREEZE) * STEPS_PER_EPOCH
    if reset is None:  # the default
        assert watch.at_unfreeze == {}
        assert watch.final_steps == [after] * len(watch.final_steps)  # every parameter restarted its count
    else:
        assert float(watch.at_unfreeze["step"]) == UNFREEZE * STEPS_PER_EPOCH
        assert max(watch.final_steps) == EPOCHS * STEPS_PER_EPOCH


@pytest.mark.parametrize("epoch", [0, 3])  # before and after the unfreeze
def test_resume_across_the_unfreeze(tmp_path: Path, epoch: int) -> None:
    full, full_rec, _, _ = fit(tmp_path, "full")
    ckpt = tmp_path / "full" / f"epoch={epoch}-step={(epoch + 1) * STEPS_PER_EPOCH}.ckpt"
    resumed, rec, _, _ = fit(tmp_path, "resumed", ckpt_path=str(ckpt), seed=7)
    start = (epoch + 1) * STEPS_PER_EPOCH
    assert rec.lrs == full_rec.lrs[start:]
    for (name, a), b in zip(resumed.state_dict().items(), full.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_needs_layer_groups_and_all_params_in_the_optimizer() -> None:
    with pytest.raises(MisconfigurationException, match="layer_groups"):
        trainer(max_steps=2, callbacks=[FreezeUnfreeze(1)]).fit(BoringModel())

    class HeadOnly(ThreeGroups):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(p for p in self.parameters() if p.requires_grad)

    with pytest.raises(MisconfigurationException, match="every layer group's parameters in the optimizer"):
        trainer(max_steps=2, callbacks=[FreezeUnfreeze(1)]).fit(HeadOnly(), loader())
    with pytest.raises(ValueError, match="lrs must be positive"):
        FreezeUnfreeze(1, lrs=[1e-3, -1])
