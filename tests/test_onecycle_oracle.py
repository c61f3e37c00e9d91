"""OneCycleWD + registry optimizers against trusted oracles, parameter for parameter, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny import Recorder, TinyRegression, loader, make_net, oracle_loop, trainer
from torch.optim.lr_scheduler import CosineAnnealingLR, OneCycleLR

from lightning_adamw import Constant, DecoupledDecay, OneCycle, OneCycle2018, OneCycleWD, OptimizerConfig

EPOCHS, STEPS = 7, 56  # 64 samples / batch 8 = 8 steps per epoch


def fit(config: OptimizerConfig, callback: OneCycleWD, epochs: int = EPOCHS, **trainer_kwargs) -> TinyRegression:
    model = TinyRegression(config)
    trainer(max_epochs=epochs, callbacks=[callback], **trainer_kwargs).fit(model, loader())
    return model


def assert_same_weights(model: TinyRegression, net: torch.nn.Module) -> None:
    for (name, a), b in zip(model.net.named_parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("scheduled", [False, True])
def test_adam_decoupled_equals_torch_adamw(amsgrad: bool, scheduled: bool) -> None:
    lr, wd, betas = 3e-3, 0.1, (0.9, 0.99)
    name = "amsgrad" if amsgrad else "adam"
    config = OptimizerConfig(name, lr=lr, betas=betas, weight_decay=wd, wd_mode="decoupled")
    model = fit(config, OneCycleWD(OneCycle() if scheduled else Constant()))

    net = make_net()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=betas, weight_decay=wd, amsgrad=amsgrad)
    sched = OneCycleLR(opt, max_lr=lr, total_steps=STEPS) if scheduled else None
    oracle_loop(net, opt, sched, EPOCHS)
    assert_same_weights(model, net)


def test_registry_adamw_name_equals_torch_adamw_with_2018_shape() -> None:
    lr, wd = 3e-3, 0.3
    model = fit(OptimizerConfig("adamw", lr=lr, betas=(0.95, 0.99), weight_decay=wd),
                OneCycleWD(OneCycle2018(div_factor=10, pct=0.075)))
    net = make_net()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.95, 0.99), weight_decay=wd)
    sched = OneCycleLR(opt, max_lr=lr, total_steps=STEPS, pct_start=(1 - 0.075) / 2, div_factor=10,
                       final_div_factor=100, anneal_strategy="linear", three_phase=True)
    oracle_loop(net, opt, sched, EPOCHS)
    assert_same_weights(model, net)


@pytest.mark.parametrize("name, torch_cls, kwargs", [
    ("adam", torch.optim.Adam, {"betas": (0.9, 0.99)}),
    ("sgd", torch.optim.SGD, {"momentum": 0.9}),
])
def test_l2_mode_equals_torch_weight_decay(name: str, torch_cls: type, kwargs: dict) -> None:
    lr, wd = 1e-2, 1e-3
    model = fit(OptimizerConfig(name, lr=lr, weight_decay=wd, wd_mode="l2", **kwargs), OneCycleWD(OneCycle()))
    net = make_net()
    opt = torch_cls(net.parameters(), lr=lr, weight_decay=wd, **kwargs)
    oracle_loop(net, opt, OneCycleLR(opt, max_lr=lr, total_steps=STEPS), EPOCHS)
    assert_same_weights(model, net)


def test_sgd_decoupled_equals_the_update_written_out() -> None:
    lr, wd = 5e-2, 1e-2
    schedule = OneCycle(pct_start=0.25)
    model = fit(OptimizerConfig("sgdw", lr=lr, weight_decay=wd), OneCycleWD(schedule))

    net = make_net()
    params = list(net.parameters())
    buffers: list[torch.Tensor | None] = [None] * len(params)
    step = 0
    for _ in range(EPOCHS):
        for x, y in loader():
            for p in params:
                p.grad = None
            torch.nn.functional.mse_loss(net(x), y).backward()
            mult, momentum = schedule(step, STEPS)
            lr_t = lr * mult
            with torch.no_grad():
                for i, p in enumerate(params):
                    p.mul_(1 - lr_t * wd)  # decoupled: w <- w - lr_t * wd * w
                    buf = p.grad.clone() if buffers[i] is None else momentum * buffers[i] + p.grad
                    buffers[i] = buf
                    p.sub_(lr_t * buf)
            step += 1
    assert_same_weights(model, net)


def test_schedule_convention_decays_by_eta_times_lambda() -> None:
    lr, wd = 3e-3, 0.05
    model = fit(OptimizerConfig("adamw", lr=lr, betas=(0.9, 0.99), weight_decay=wd),
                OneCycleWD(OneCycle(), wd_convention="schedule"))
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))
    sched = OneCycleLR(opt, max_lr=lr, total_steps=STEPS)

    def decay(step: int) -> None:
        eta = opt.param_groups[0]["lr"] / lr  # the schedule multiplier, not the lr
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1 - eta * wd)

    oracle_loop(net, opt, sched, EPOCHS, before_step=decay)
    assert_same_weights(model, net)


def test_normalised_weight_decay() -> None:
    lr, wd_norm = 3e-3, 0.05
    model = fit(OptimizerConfig("adamw", lr=lr, weight_decay=wd_norm), OneCycleWD(Constant(), normalized=True))
    net = make_net()
    # lambda = lambda_norm * sqrt(b / (B * T)) with b = 8, B = 64, T = 7 epochs
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd_norm * math.sqrt(8 / (64 * EPOCHS)))
    oracle_loop(net, opt, None, EPOCHS)
    assert_same_weights(model, net)


def test_plain_torch_optimizer_with_callback_weight_decay() -> None:
    """Any torch optimizer: the callback's own weight_decay is applied to all groups."""
    lr, wd = 3e-3, 0.1
    model = TinyRegression(lambda params: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99)))
    trainer(max_epochs=EPOCHS, callbacks=[OneCycleWD(weight_decay=wd)]).fit(model, loader())
    net = make_net()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=wd)
    oracle_loop(net, opt, OneCycleLR(opt, max_lr=lr, total_steps=STEPS), EPOCHS)
    assert_same_weights(model, net)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_callback_sets_lr_and_momentum_of_torch_onecycle(optimizer: str) -> None:
    """Values at each optimizer step equal OneCycleLR's, for SGD momentum and Adam beta1."""
    recorder = Recorder()
    config = OptimizerConfig(optimizer, lr=0.1)
    model = TinyRegression(config)
    trainer(max_epochs=EPOCHS, callbacks=[OneCycleWD(OneCycle(three_phase=True)), recorder]).fit(model, loader())
    probe = torch.zeros(1, requires_grad=True)
    ref_opt = torch.optim.SGD([probe], lr=0.1, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam([probe])
    ref = OneCycleLR(ref_opt, max_lr=0.1, total_steps=STEPS, three_phase=True)
    assert recorder.steps == list(range(STEPS))
    for step in range(STEPS):
        group = ref_opt.param_groups[0]
        assert recorder.lrs[step][0] == pytest.approx(group["lr"], rel=1e-12)
        want_mom = group["momentum"] if optimizer == "sgd" else group["betas"][0]
        assert recorder.momenta[step][0] == pytest.approx(want_mom, rel=1e-12)
        ref_opt.step()
        ref.step()


def test_decoupled_decay_alone_with_a_module_scheduler_equals_adamw() -> None:
    """DecoupledDecay: the decay without OneCycleWD, composed with the module's own CosineAnnealingLR."""
    lr, wd = 3e-3, 0.1

    class WithCosine(TinyRegression):
        def configure_optimizers(self):
            opt = self.optimizer_factory.build(self.net)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": CosineAnnealingLR(opt, STEPS), "interval": "step"}}

    model = WithCosine(OptimizerConfig("adamw", lr=lr, betas=(0.9, 0.99), weight_decay=wd))
    trainer(max_epochs=EPOCHS, callbacks=[DecoupledDecay()]).fit(model, loader())
    net = make_net()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=wd)
    oracle_loop(net, opt, CosineAnnealingLR(opt, STEPS), EPOCHS)
    assert_same_weights(model, net)
