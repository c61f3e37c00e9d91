"""Registry entries from the optional extra (pytorch-optimizer): Lion and schedule-free AdamW."""

from __future__ import annotations

import pytest
import pytorch_optimizer
import torch
from _tiny import TinyRegression, loader, make_net, oracle_loop, trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim.lr_scheduler import OneCycleLR

from lightning_adamw import OneCycleWD, OptimizerConfig
from lightning_adamw.registry import _REGISTRY, OptionalFactory, register_optimizer

EPOCHS, STEPS = 7, 56


def test_lion_with_onecycle_decay_equals_lions_own_decoupled_decay() -> None:
    lr, wd, betas = 3e-4, 0.5, (0.9, 0.99)
    model = TinyRegression(OptimizerConfig("lion", lr=lr, weight_decay=wd, betas=betas))
    trainer(max_epochs=EPOCHS, callbacks=[OneCycleWD()]).fit(model, loader())
    net = make_net()
    opt = pytorch_optimizer.Lion(net.parameters(), lr=lr, betas=betas, weight_decay=wd, weight_decouple=True)
    oracle_loop(net, opt, OneCycleLR(opt, max_lr=lr, total_steps=STEPS), EPOCHS)
    for a, b in zip(model.net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_lion_training_lowers_the_loss() -> None:
    model = TinyRegression(OptimizerConfig("lion", lr=2e-2, weight_decay=0.1))
    x, y = loader(batch_size=64).dataset.tensors
    before = torch.nn.functional.mse_loss(model(x), y).item()
    trainer(max_epochs=10, callbacks=[OneCycleWD()]).fit(model, loader())
    assert torch.nn.functional.mse_loss(model(x), y).item() < 0.5 * before


def test_schedulefree_adamw_keeps_its_own_decay_and_trains() -> None:
    net = make_net()
    opt = OptimizerConfig("schedulefree_adamw", lr=1e-2, weight_decay=1e-3).build(net)
    assert opt.param_groups[0]["weight_decay"] == 1e-3 and opt.param_groups[0]["decoupled_wd"] == 0.0
    x, y = loader(batch_size=64).dataset.tensors
    opt.eval()
    before = torch.nn.functional.mse_loss(net(x), y).item()
    opt.train()
    for _ in range(5):
        for xb, yb in loader():
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(xb), yb).backward()
            opt.step()
    opt.eval()  # the averaged (evaluation) weights
    assert torch.nn.functional.mse_loss(net(x), y).item() < 0.5 * before


def test_onecycle_refuses_a_schedule_free_optimizer() -> None:
    model = TinyRegression(OptimizerConfig("schedulefree_adamw", lr=1e-3))
    with pytest.raises(MisconfigurationException, match="schedule-free.*Replace OneCycleWD with .*ScheduleFreeEval"):
        trainer(max_steps=2, callbacks=[OneCycleWD()]).fit(model, loader())


def test_missing_extra_names_the_install_command() -> None:
    try:
        register_optimizer("missing_test", OptionalFactory("no_such_package_xyz", "Opt", "no-such-package", "optim"))
        with pytest.raises(ValueError, match=r"pip install 'lightning-adamw\[optim\]'"):
            OptimizerConfig("missing_test")
    finally:
        _REGISTRY.pop("missing_test", None)
