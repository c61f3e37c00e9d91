"""Schedule shapes against torch's OneCycleLR and the recipes' phase boundaries."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import OneCycleLR

from lightning_adamw import Constant, OneCycle, OneCycle2018, OneCycleLM, Phase, Schedule


def torch_trajectory(optimizer_cls: type, total: int, max_lr: float, **kwargs) -> tuple[list, list]:
    param = torch.zeros(1, requires_grad=True)
    opt = optimizer_cls([param], lr=max_lr)
    sched = OneCycleLR(opt, max_lr=max_lr, total_steps=total, **kwargs)
    lrs, moms = [], []
    for _ in range(total):
        group = opt.param_groups[0]
        lrs.append(group["lr"])
        moms.append(group["betas"][0] if "betas" in group else group["momentum"])
        opt.step()
        sched.step()
    return lrs, moms


CASES = [
    dict(),
    dict(three_phase=True),
    dict(pct_start=0.25, div_factor=10, final_div_factor=100, anneal_strategy="linear", three_phase=True),
    dict(pct_start=0.4, anneal_strategy="linear", base_momentum=0.8, max_momentum=0.9),
]


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("total", [97, 1000])
def test_onecycle_reproduces_torch_step_for_step(optimizer_cls: type, kwargs: dict, total: int) -> None:
    max_lr = 0.37
    want_lr, want_mom = torch_trajectory(optimizer_cls, total, max_lr, **kwargs)
    anneal = kwargs.pop("anneal_strategy", "cos")
    schedule = OneCycle(anneal=anneal, **kwargs)
    for step in range(total):
        mult, mom = schedule(step, total)
        assert max_lr * mult == pytest.approx(want_lr[step], rel=1e-12, abs=1e-15), step
        assert mom == pytest.approx(want_mom[step], rel=1e-12), step


def test_onecycle2018_is_torch_three_phase_linear() -> None:
    total, pct = 400, 0.075
    want_lr, want_mom = torch_trajectory(torch.optim.Adam, total, 3e-3, pct_start=(1 - pct) / 2, div_factor=10,
                                         final_div_factor=100, anneal_strategy="linear", three_phase=True)
    schedule = OneCycle2018(div_factor=10, pct=pct)
    got = [schedule(s, total) for s in range(total)]
    assert [3e-3 * m for m, _ in got] == pytest.approx(want_lr, rel=1e-12)
    assert [m for _, m in got] == pytest.approx(want_mom, rel=1e-12)


def test_onecycle2018_hits_phase_boundaries() -> None:
    total, pct, div = 1000, 0.1, 10.0
    schedule = OneCycle2018(div_factor=div, pct=pct)
    first, second = schedule.phase_ends(total)[:2]
    assert first == pytest.approx((1 - pct) / 2 * total - 1)
    assert second == pytest.approx((1 - pct) * total - 2)
    assert schedule(0, total) == pytest.approx((1 / div, 0.95))
    assert schedule(int(first), total) == pytest.approx((1.0, 0.85))  # peak lr, lowest momentum
    assert schedule(int(second), total) == pytest.approx((1 / div, 0.95))
    assert schedule(total - 1, total) == pytest.approx((1 / (100 * div), 0.95))
    # the last phase holds momentum constant and anneals lr linearly
    mid = (int(second) + total - 1) // 2
    lr_mid, mom_mid = schedule(mid, total)
    assert mom_mid == 0.95
    assert lr_mid == pytest.approx(1 / div + (1 / (100 * div) - 1 / div) * (mid - second) / (total - 1 - second))


def test_lm_shape_phase_boundaries() -> None:
    total = 9000  # 90 epochs of 100 steps: boundaries at 7.5, 45 and 82.5 epochs
    schedule = OneCycleLM()
    ends = schedule.phase_ends(total)
    assert ends == pytest.approx([750 - 1, 4500 - 2, 8250 - 3, total - 1])
    assert schedule(0, total) == pytest.approx((0.1, 0.8))
    assert schedule(749, total) == pytest.approx((1.0, 0.7))  # end of warm-up
    assert schedule(2000, total) == pytest.approx((1.0, 0.7))  # plateau
    assert schedule(4498, total) == pytest.approx((1.0, 0.7))  # end of plateau
    assert schedule(8247, total) == pytest.approx((0.1, 0.8))  # end of cool-down
    lr_end, mom_end = schedule(total - 1, total)
    assert lr_end == pytest.approx(0.0, abs=1e-12) and mom_end == 0.8
    # the last phase is a half cosine from max/10 to 0
    s = (8247 + total - 1) // 2
    pct = (s - 8247) / (total - 1 - 8247)
    assert schedule(s, total)[0] == pytest.approx(0.05 * (math.cos(math.pi * pct) + 1))


def test_lm_shape_normalises_epochs() -> None:
    a, b = OneCycleLM(7.5, 37.5, 37.5, 7.5), OneCycleLM(1, 5, 5, 1)
    assert [p.frac for p in a.phases] == pytest.approx([p.frac for p in b.phases])


def test_constant_and_custom_phases() -> None:
    assert Constant()(5, 10) == (1.0, None)
    custom = Schedule([Phase(0.5, (0.0, 1.0)), Phase(0.5, (1.0, 1.0), anneal="constant")])
    assert custom(0, 11)[0] == 0.0
    assert custom(10, 11)[0] == 1.0
    assert not custom.cycles_momentum


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Schedule([Phase(0.5, (1, 1))]), "sum to 1"),
        (lambda: Phase(0.0, (1, 1)), "frac"),
        (lambda: Phase(1.0, (1, 1), anneal="cosine"), "anneal"),
        (lambda: OneCycle(pct_start=0.6, three_phase=True), "pct_start"),
        (lambda: OneCycle2018(pct=1.5), "pct"),
        (lambda: OneCycleLM(warmup=0), "positive"),
    ],
)
def test_bad_schedule_arguments_name_the_problem(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_steps_past_the_end_hold_the_last_value() -> None:
    schedule = OneCycle()
    assert schedule(150, 100) == schedule(99, 100)
