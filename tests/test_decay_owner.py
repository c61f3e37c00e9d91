"""Decoupled weight decay has one owner: every mix of callbacks and optimizers decays once or is refused at start.

An idle parameter (its gradient is exactly zero) is moved by nothing but weight decay, with Adam and SGD alike, so
after ``STEPS`` steps at a constant lr it holds ``(1 - lr * wd) ** (number of decays applied)``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _tiny import TinyRegression, loader, regression_data, trainer
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import Constant, DecoupledDecay, OneCycleWD, OptimizerConfig, ScheduleFreeEval
from lightning_adamw.decay import DecoupledWeightDecay

LR, WD, STEPS = 0.1, 0.1, 4
ONCE = (1 - LR * WD) ** STEPS


class WithIdle(TinyRegression):
    """TinyRegression plus a weight whose gradient is exactly zero."""

    def __init__(self, optimizer: Any) -> None:
        super().__init__(optimizer)
        self.idle = nn.Parameter(torch.ones(3, 3, dtype=torch.float64))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + 0.0 * self.idle.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if isinstance(self.optimizer_factory, OptimizerConfig):
            return self.optimizer_factory.build(self)
        return self.optimizer_factory(self.parameters())


def l2_adam_oracle() -> float:
    """The idle weight under torch's Adam with L2 weight decay (the gradient is ``wd * w`` alone)."""
    w = torch.ones(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=LR, weight_decay=WD)
    for _ in range(STEPS):
        w.grad = torch.zeros_like(w)
        opt.step()
    return float(w.detach())


OPTIMIZERS = {
    "registry_decoupled": lambda: OptimizerConfig("adam", lr=LR, weight_decay=WD, wd_mode="decoupled"),
    "registry_l2": lambda: OptimizerConfig("adam", lr=LR, weight_decay=WD, wd_mode="l2"),
    "torch_adam": lambda: (lambda params: torch.optim.Adam(params, lr=LR)),
    "torch_adamw_own_decay": lambda: (lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=WD)),
}
CALLBACKS = {
    "DD()": lambda: DecoupledDecay(),
    "DD(wd)": lambda: DecoupledDecay(weight_decay=WD),
    "OC()": lambda: OneCycleWD(Constant()),
    "OC(wd)": lambda: OneCycleWD(Constant(), weight_decay=WD),
}
BOTH = "OneCycleWD applies the decoupled weight decay.*DecoupledDecay would apply it as well"
NOTHING = "DecoupledDecay has nothing to apply"
UNCHANGED = "would change nothing"
TWICE = "own weight_decay=0.1.*decay must happen once"
L2 = "l2"
# (optimizer, callbacks) -> the idle weight's value (ONCE, 1.0: no decoupled decay, L2: torch Adam's L2) or the
# refusal's message; every pair appears in both orders
EXPECTED: dict[tuple[str, tuple[str, ...]], Any] = {}
for _cbs, _outcomes in {
    (): (ONCE, L2, 1.0, ONCE),
    ("DD()",): (ONCE, NOTHING, NOTHING, NOTHING),
    ("DD(wd)",): (UNCHANGED, UNCHANGED, ONCE, TWICE),
    ("OC()",): (ONCE, L2, 1.0, ONCE),
    ("OC(wd)",): (UNCHANGED, UNCHANGED, ONCE, TWICE),
    ("DD()", "OC()"): (BOTH, NOTHING, NOTHING, NOTHING),
    ("DD(wd)", "OC()"): (BOTH, UNCHANGED, ONCE, TWICE),
    ("DD()", "OC(wd)"): (BOTH, BOTH, BOTH, BOTH),
    ("DD(wd)", "OC(wd)"): (BOTH, BOTH, BOTH, BOTH),
}.items():
    for _order in {_cbs, _cbs[::-1]}:
        for _name, _outcome in zip(OPTIMIZERS, _outcomes):
            EXPECTED[_name, _order] = _outcome


@pytest.mark.parametrize("optimizer, callbacks", sorted(EXPECTED),
                         ids=[f"{o}-{'+'.join(c) or 'no_callback'}" for o, c in sorted(EXPECTED)])
def test_every_mix_decays_once_or_is_refused(optimizer: str, callbacks: tuple[str, ...]) -> None:
    model = WithIdle(OPTIMIZERS[optimizer]())
    fit = trainer(max_steps=STEPS, callbacks=[CALLBACKS[c]() for c in callbacks])
    expected = EXPECTED[optimizer, callbacks]
    if isinstance(expected, str) and expected != L2:
        with pytest.raises(MisconfigurationException, match=expected):
            fit.fit(model, loader())
        assert torch.equal(model.idle.detach(), torch.ones(3, 3, dtype=torch.float64))  # refused before any step
        return
    fit.fit(model, loader())
    want = l2_adam_oracle() if expected == L2 else expected
    torch.testing.assert_close(model.idle.detach(), torch.full((3, 3), want, dtype=torch.float64), rtol=1e-13, atol=0)


def test_the_measured_double_decay_is_gone() -> None:
    """The report: DecoupledDecay before OneCycleWD decayed each step twice (0.99 ** 8), the other order raised."""
    for order in ([DecoupledDecay(), OneCycleWD(Constant())], [OneCycleWD(Constant()), DecoupledDecay()]):
        model = WithIdle(OPTIMIZERS["registry_decoupled"]())
        with pytest.raises(MisconfigurationException, match=BOTH):
            trainer(max_steps=STEPS, callbacks=order).fit(model, loader())


@pytest.mark.parametrize("second", [DecoupledDecay, lambda: DecoupledDecay(weight_decay=WD), OneCycleWD])
@pytest.mark.parametrize("first_is_eval", [True, False])
def test_schedule_free_keeps_its_own_decay_and_refuses_a_second(second: Any, first_is_eval: bool) -> None:
    pytest.importorskip("pytorch_optimizer")
    config = OptimizerConfig("schedulefree_adamw", lr=1e-2, weight_decay=WD)
    callbacks = [ScheduleFreeEval(), second()] if first_is_eval else [second(), ScheduleFreeEval()]
    with pytest.raises(MisconfigurationException, match="schedule-free"):
        trainer(max_steps=2, callbacks=callbacks).fit(TinyRegression(config), loader())


def test_schedule_free_with_its_callback_decays_as_the_optimizer_alone() -> None:
    """ScheduleFreeEval adds no decay: the trained y-weights equal the bare optimizer's in a plain loop."""
    pytest.importorskip("pytorch_optimizer")
    from pytorch_optimizer import ScheduleFreeAdamW

    config = OptimizerConfig("schedulefree_adamw", lr=1e-2, weight_decay=WD)
    model = TinyRegression(config)
    sfe = ScheduleFreeEval()
    trainer(max_steps=STEPS, callbacks=[sfe]).fit(model, loader())
    net = TinyRegression().net
    opt = ScheduleFreeAdamW(net.parameters(), lr=1e-2, weight_decay=WD)
    opt.train()
    for step, (x, y) in enumerate(loader()):
        if step == STEPS:
            break
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    opt.eval()  # the module holds the averaged weights after fit
    for a, b in zip(model.net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_registry_decay_in_a_plain_loop_skips_the_step_gradscaler_skips() -> None:
    """No callback, GradScaler on CPU: a step with inf gradients is skipped, its decay with it."""
    idle = nn.Parameter(torch.ones(3, 3))
    net = nn.Linear(3, 1)
    opt = OptimizerConfig("adam", lr=LR, weight_decay=WD, wd_mode="decoupled").build([net, nn.ParameterList([idle])])
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    values = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = net(torch.ones(2, 3)).sum() + 0.0 * idle.sum()
        scaler.scale(loss * float("inf") if step == 1 else loss).backward()
        scaler.step(opt)
        scaler.update()
        values.append(float(idle[0, 0]))
    expected = [(1 - LR * WD) ** n for n in (1, 1, 2, 3)]  # step 1 skipped
    assert values == pytest.approx(expected, rel=1e-6)


def test_decoupled_decay_skips_a_step_that_fp16_skips() -> None:
    class InfAtStep1(WithIdle):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if self.global_step == 1 else loss

    model = InfAtStep1(lambda params: torch.optim.Adam(params, lr=LR))
    model.float()
    x, y = regression_data().tensors
    data = DataLoader(TensorDataset(x.float(), y.float()), batch_size=8)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    trainer(max_steps=STEPS, plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
            callbacks=[DecoupledDecay(weight_decay=WD)]).fit(model, data)
    expected = (1 - LR * WD) ** (STEPS - 1)
    torch.testing.assert_close(model.idle.detach(), torch.full((3, 3), expected), rtol=1e-6, atol=0)


def test_one_component_per_optimizer() -> None:
    opt = OptimizerConfig("adamw", lr=LR, weight_decay=WD).build(nn.Linear(2, 2))
    decay = DecoupledWeightDecay.of(opt)
    assert decay is not None and DecoupledWeightDecay.attach(opt) is decay
    assert DecoupledWeightDecay.of(OptimizerConfig("adam", lr=LR, weight_decay=WD).build(nn.Linear(2, 2))) is None
