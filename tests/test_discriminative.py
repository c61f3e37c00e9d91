"""What fastai and timm users expect: ``lr_range`` (fastai's ``slice``) and ``layer_decay`` (timm) give the documented
lr per layer group, the ``fine_tune`` preset reproduces the Stanford Cars recipe's two cycles, torchvision backbones
get a default layer split, optimizer names ignore case, and frozen groups are logged at lr 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _tiny
import numpy as np
import pytest
import torch
import torchvision
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_pytorch_lightning import onecycle_oracle
from torch import nn

from lightning_adamw import (
    Constant,
    FreezeUnfreeze,
    OneCycle2018,
    OneCycleWD,
    OptimizerConfig,
    backbone_layer_groups,
    get_optimizer_entry,
)
from lightning_adamw.cli import main

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 8


def three_groups() -> list[nn.Module]:
    return [nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)]


def group_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [g["lr"] for g in optimizer.param_groups]


def test_lr_range_is_fastais_geometric_slice() -> None:
    lrs = group_lrs(OptimizerConfig("adamw", lr_range=(1e-5, 1e-3)).build(three_groups()))
    np.testing.assert_allclose(lrs, np.geomspace(1e-5, 1e-3, 3), rtol=1e-12)  # fastai even_mults: 1e-5, 1e-4, 1e-3
    cars = group_lrs(OptimizerConfig("adam", lr_range=(3e-3 / 9, 3e-3)).build(three_groups()))
    np.testing.assert_allclose(cars, [3e-3 / 9, 3e-3 / 3, 3e-3], rtol=1e-12)


def test_layer_decay_is_timms_per_depth_multiplier() -> None:
    groups = [nn.Linear(2, 2) for _ in range(5)]
    lrs = group_lrs(OptimizerConfig("adamw", lr=1e-3, layer_decay=0.75).build(groups))
    np.testing.assert_allclose(lrs, [1e-3 * 0.75 ** (4 - i) for i in range(5)], rtol=1e-12)  # the head keeps lr


def test_spreads_use_the_modules_layer_groups_method() -> None:
    model = _tiny.TinyRegression()
    optimizer = OptimizerConfig("adam", lr=1e-2, layer_decay=0.1).build(model)
    np.testing.assert_allclose(group_lrs(optimizer), [1e-3, 1e-2], rtol=1e-12)
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(model.net.parameters())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": [1e-3, 1e-2], "lr_range": (1e-4, 1e-3)}, "lr_range=.* sets every layer group's lr"),
    ({"lr": 1e-3, "lr_range": (1e-4, 1e-3)}, "so lr would be ignored"),
    ({"layer_decay": 0.7, "lr_range": (1e-4, 1e-3)}, "so layer_decay would be ignored"),
    ({"lr": [1e-3, 1e-2], "layer_decay": 0.7}, "give a single lr"),
    ({"lr_range": (1e-3, 1e-4)}, "0 < lo <= hi"),
    ({"layer_decay": 0.0}, "layer_decay must be positive"),
])
def test_conflicting_lr_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OptimizerConfig("adamw", **kwargs)


@pytest.mark.parametrize("option", [{"lr_range": (1e-4, 1e-3)}, {"layer_decay": 0.7}])
def test_spreads_without_layer_groups_are_refused(option: dict[str, Any]) -> None:
    config = OptimizerConfig("adamw", **option)
    with pytest.raises(ValueError, match="Linear has no layer_groups.. method and holds no torchvision backbone"):
        config.build(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not a list of at least two modules"):
        config.build([nn.Linear(2, 2)])


def test_lr_range_from_the_cli(tmp_path: Path) -> None:
    cli = main(["fit", "--model", "_tiny.TinyCLIModel", "--data", "_tiny.TinyData", "--model.optimizer.name", "AdamW",
                "--model.optimizer.lr_range", "[1e-4, 1e-2]", "--model.optimizer.weight_decay", "0.1",
                "--trainer.callbacks", "OneCycleWD", "--trainer.max_steps", "1", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert cli.model.optimizer_factory.name == "adamw"
    onecycle = next(c for c in cli.trainer.callbacks if isinstance(c, OneCycleWD))  # the CLI adds a DivergenceGuard
    np.testing.assert_allclose(onecycle._cycles[0][0]["max_lrs"], [1e-4, 1e-2], rtol=1e-12)


def test_optimizer_names_ignore_case() -> None:
    assert OptimizerConfig("AdamW").name == "adamw" and get_optimizer_entry("SGDW").name == "sgdw"
    assert OptimizerConfig("AdamW").resolved_wd_mode == "decoupled"
    with pytest.raises(ValueError, match="Unknown optimizer 'Adamm'. Did you mean 'adam'"):
        OptimizerConfig("Adamm")


def _all_params_once(groups: list[nn.Module], model: nn.Module) -> None:
    ids = [id(p) for g in groups for p in g.parameters()]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}


def test_backbone_layer_groups_split_torchvision_models() -> None:
    net = torchvision.models.resnet18(num_classes=3)
    stem_l2, l3_l4, head = backbone_layer_groups(net)
    assert list(stem_l2) == [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2]
    assert list(l3_l4) == [net.layer3, net.layer4] and list(head) == [net.avgpool, net.fc]
    for build in (torchvision.models.efficientnet_b0, torchvision.models.convnext_tiny):
        model = build(num_classes=3)
        groups = backbone_layer_groups(model)
        _all_params_once(groups, model)
        assert groups[-1][-1] is model.classifier

    class WithOwnHead(nn.Module):  # a LightningModule-like wrapper: backbone plus a head of its own
        def __init__(self) -> None:
            super().__init__()
            self.body = torchvision.models.resnet18()
            self.body.fc = nn.Identity()
            self.extra = nn.Linear(512, 3)

    wrapped = WithOwnHead()
    groups = backbone_layer_groups(wrapped)
    _all_params_once(groups, wrapped)
    assert groups[-1][-1] is wrapped.extra
    with pytest.raises(ValueError, match="no torchvision ResNet, EfficientNet or ConvNeXt"):
        backbone_layer_groups(nn.Linear(2, 2))


class ThreeGroups(_tiny.TinyRegression):
    """Body of two groups and a head, trained with the Cars recipe's optimizer."""

    def __init__(self, optimizer: OptimizerConfig) -> None:
        super().__init__(optimizer)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).double()

    def layer_groups(self) -> list[nn.Module]:
        return [self.net[0:2], self.net[2:4], self.net[4:]]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory.build(self.layer_groups())


def test_fine_tune_preset_reproduces_the_cars_recipe(tmp_path: Path) -> None:
    cars = yaml.safe_load((ROOT / "configs" / "cars.yaml").read_text())
    onecycle, freeze = (c["init_args"] for c in cars["trainer"]["callbacks"][:2])
    schedule = onecycle["schedule"]["init_args"]
    head_lr = cars["model"]["init_args"]["optimizer"]["lr"]
    assert (freeze["unfreeze_at_epoch"], cars["trainer"]["max_epochs"], head_lr) == (20, 60, 1e-2)

    # the recipe at a tenth of the epochs: 2 head epochs, then 4 unfrozen (20 and 40 in configs/cars.yaml)
    callbacks = FreezeUnfreeze.fine_tune(2, lr=head_lr, unfrozen_lr=3e-3, lr_mult=9, schedule=OneCycle2018(**schedule))
    optimizer = OptimizerConfig(**{k: v for k, v in cars["model"]["init_args"]["optimizer"].items()})
    model = ThreeGroups(optimizer)
    body_before = [p.detach().clone() for p in model.net[0:4].parameters()]
    recorder = _tiny.Recorder()

    class BodyAtUnfreeze(_tiny.Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 2:
                self.body = [p.detach().clone() for p in model.net[0:4].parameters()]

    at_unfreeze = BodyAtUnfreeze()
    logger = TensorBoardLogger(tmp_path, name="tb", version="run")
    trainer = _tiny.trainer(max_epochs=6, callbacks=[*callbacks, recorder, at_unfreeze], logger=logger,
                            log_every_n_steps=1)
    trainer.fit(model, _tiny.loader(8))

    np.testing.assert_allclose(callbacks[1].lrs, freeze["lrs"], rtol=1e-7)  # [3e-3/9, 3e-3/3, 3e-3] as in the YAML
    head = onecycle_oracle(head_lr, 2 * STEPS_PER_EPOCH, schedule["div_factor"], schedule["pct"])
    unfrozen = onecycle_oracle(1.0, 4 * STEPS_PER_EPOCH, schedule["div_factor"], schedule["pct"])
    expected = [[lr] * 3 for lr in head] + [[peak * m for peak in freeze["lrs"]] for m in unfrozen]
    np.testing.assert_allclose(recorder.lrs, expected, rtol=1e-6)
    for before, after in zip(body_before, at_unfreeze.body):
        torch.testing.assert_close(before, after, rtol=0, atol=0)  # the body did not train in the head cycle

    # TensorBoard shows no cycle for a frozen group: lr 0 until the unfreeze, then the fresh cycle
    events = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: [e.value for e in events.Scalars(tag)] for tag in ("lr/pg0", "lr/pg1", "lr/pg2")}
    shown = np.array([logged["lr/pg0"], logged["lr/pg1"], logged["lr/pg2"]]).T
    shown_expected = np.array(expected)
    shown_expected[: 2 * STEPS_PER_EPOCH, :2] = 0.0
    np.testing.assert_allclose(shown, shown_expected, rtol=1e-6)



def test_a_frozen_group_logs_decoupled_decay_zero(tmp_path: Path) -> None:
    """The decay factor is applied to parameters with a gradient only, so a frozen group logs wd 0, not lr * wd."""
    model = ThreeGroups(OptimizerConfig("adam", lr=1e-2, weight_decay=0.1, wd_mode="decoupled"))
    model.net[0:2].requires_grad_(False)
    frozen = [p.detach().clone() for p in model.net[0:2].parameters()]
    logger = TensorBoardLogger(tmp_path, name="tb", version="run")
    _tiny.trainer(max_epochs=1, callbacks=[OneCycleWD(Constant())], logger=logger, log_every_n_steps=1).fit(
        model, _tiny.loader(8))
    events = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: [e.value for e in events.Scalars(tag)] for tag in ("wd/pg0", "wd/pg1", "lr/pg0", "lr/pg1")}
    assert logged["wd/pg0"] == logged["lr/pg0"] == [0.0] * STEPS_PER_EPOCH
    np.testing.assert_allclose(logged["wd/pg1"], [1e-2 * 0.1] * STEPS_PER_EPOCH, rtol=1e-6)
    np.testing.assert_allclose(logged["lr/pg1"], [1e-2] * STEPS_PER_EPOCH, rtol=1e-6)
    for before, after in zip(frozen, model.net[0:2].parameters()):
        torch.testing.assert_close(before, after.detach(), rtol=0, atol=0)  # nor decayed

def test_a_run_shorter_than_log_every_n_steps_warns_that_no_schedule_is_logged(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version="run")
    trainer = _tiny.trainer(max_epochs=1, callbacks=[OneCycleWD()], logger=logger, log_every_n_steps=50)
    with pytest.warns(UserWarning, match=r"log_every_n_steps=50\) is more than this run's 8 optimizer steps"):
        trainer.fit(_tiny.TinyRegression(), _tiny.loader(8))
    events = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"scalars": 0})
    events.Reload()
    assert "lr" not in events.Tags()["scalars"]  # what the warning says: nothing was logged
