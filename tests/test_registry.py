"""The optimizer registry: names, weight-decay modes, parameter groups, clear errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_adamw import (
    OptimizerConfig,
    available_optimizers,
    build_optimizer,
    get_optimizer_entry,
    param_groups,
    register_optimizer,
)
from lightning_adamw.registry import _REGISTRY


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)).eval()


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_builtin_names() -> None:
    assert {"sgd", "sgdw", "adam", "adamw", "amsgrad", "rmsprop"} <= set(available_optimizers())


def test_unknown_name_lists_valid_names_and_suggests() -> None:
    with pytest.raises(ValueError) as err:
        get_optimizer_entry("adamm")
    text = str(err.value)
    assert "'adamm'" in text and "Did you mean 'adam'" in text
    for name in ("sgd", "adamw", "amsgrad"):
        assert name in text
    with pytest.raises(ValueError, match="Valid names"):
        OptimizerConfig("lamb")


@pytest.mark.parametrize(
    "name, mode, cls, expect",
    [
        ("adam", None, torch.optim.Adam, {"weight_decay": 0.1, "decoupled_wd": 0.0, "amsgrad": False}),
        # torch's own boolean flag stays off: the decay is OneCycleWD's
        ("adam", "decoupled", torch.optim.Adam, {"weight_decay": 0.0, "decoupled_wd": 0.1,
                                                 "decoupled_weight_decay": False}),
        ("adamw", None, torch.optim.Adam, {"weight_decay": 0.0, "decoupled_wd": 0.1}),
        ("amsgrad", "l2", torch.optim.Adam, {"weight_decay": 0.1, "amsgrad": True}),
        ("amsgrad", "decoupled", torch.optim.Adam, {"weight_decay": 0.0, "decoupled_wd": 0.1,
                                                    "amsgrad": True}),
        ("sgd", None, torch.optim.SGD, {"weight_decay": 0.1, "momentum": 0.9}),
        ("sgdw", None, torch.optim.SGD, {"weight_decay": 0.0, "decoupled_wd": 0.1}),
        ("rmsprop", "l2", torch.optim.RMSprop, {"weight_decay": 0.1}),
    ],
)
def test_every_study_combination_exists(name: str, mode: str | None, cls: type, expect: dict) -> None:
    opt = build_optimizer(mlp(), name, lr=1e-3, weight_decay=0.1, wd_mode=mode)
    assert type(opt) is cls
    for key, value in expect.items():
        assert opt.param_groups[0][key] == value, key


def test_fixed_mode_conflict_names_the_fix() -> None:
    with pytest.raises(ValueError, match="use 'adam' with wd_mode='l2'"):
        OptimizerConfig("adamw", wd_mode="l2")
    with pytest.raises(ValueError, match="use 'sgd' with wd_mode='l2'"):
        build_optimizer(mlp(), "sgdw", wd_mode="l2")
    with pytest.raises(ValueError, match="wd_mode must be"):
        build_optimizer(mlp(), "adam", wd_mode="L2")  # type: ignore[arg-type]


def test_betas_eps_and_unknown_kwargs() -> None:
    opt = OptimizerConfig("adam", lr=3e-3, betas=(0.95, 0.99), eps=1e-6).build(mlp())
    assert opt.param_groups[0]["betas"] == (0.95, 0.99) and opt.param_groups[0]["eps"] == 1e-6
    with pytest.raises(ValueError, match="does not take \\['betas'\\].*momentum"):
        OptimizerConfig("sgd", betas=(0.9, 0.99)).build(mlp())
    with pytest.raises(ValueError, match="betas must lie"):
        OptimizerConfig("adam", betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="lr must be positive"):
        OptimizerConfig("adam", lr=0.0)


def test_user_registration_in_one_call() -> None:
    try:
        register_optimizer("nadam_test", torch.optim.NAdam, description="NAdam")
        assert "nadam_test" in available_optimizers()
        opt = OptimizerConfig("nadam_test", lr=2e-3, weight_decay=1e-4).build(mlp())
        assert isinstance(opt, torch.optim.NAdam) and opt.param_groups[0]["weight_decay"] == 1e-4
        with pytest.raises(ValueError, match="already registered"):
            register_optimizer("nadam_test", torch.optim.NAdam)
        with pytest.raises(ValueError, match="lowercase identifier"):
            register_optimizer("My Adam", torch.optim.Adam)
    finally:
        _REGISTRY.pop("nadam_test", None)


def test_optimizer_without_l2_refuses_l2_mode() -> None:
    try:
        register_optimizer("decoupled_only_test", torch.optim.AdamW, native_weight_decay="decoupled",
                           default_wd_mode="decoupled")
        with pytest.raises(ValueError, match="has no L2 weight decay"):
            OptimizerConfig("decoupled_only_test", wd_mode="l2")
    finally:
        _REGISTRY.pop("decoupled_only_test", None)


def test_exclude_bias_and_norm_covers_every_parameter_once() -> None:
    net = mlp()
    groups = param_groups(net, lr=1e-3, weight_decay=0.1, wd_mode="decoupled", exclude_bias_and_norm=True)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in net.parameters())
    decayed = {id(p) for g in groups if g["decoupled_wd"] > 0 for p in g["params"]}
    assert decayed == {id(net[0].weight), id(net[2].weight)}  # LayerNorm weight and all biases excluded
    default = param_groups(net, lr=1e-3, weight_decay=0.1, wd_mode="decoupled")
    assert len(default) == 1 and default[0]["decoupled_wd"] == 0.1  # 2018 default: decay everything


def test_discriminative_lrs_per_layer_group_and_tied_weights() -> None:
    net = mlp()
    groups = param_groups([net[0], net[1], net[2]], lr=[1e-4, 3e-4, 1e-3], exclude_bias_and_norm=True)
    assert [(g["layer_group"], g["lr"]) for g in groups] == [(0, 1e-4), (0, 1e-4), (1, 3e-4), (2, 1e-3), (2, 1e-3)]
    with pytest.raises(ValueError, match="3 learning rates for 2 layer groups"):
        param_groups([net[0], net[2]], lr=[1, 2, 3])
    tied = nn.ModuleList([nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)])
    tied[1].weight = tied[0].weight
    shared = param_groups([tied[0], tied[1]], lr=[0.1, 0.2])
    assert len(shared) == 1 and shared[0]["layer_group"] == 0  # a tied weight belongs to its first group


@pytest.mark.parametrize("name, torch_cls, kwargs", [
    ("adamw", torch.optim.AdamW, {"betas": (0.9, 0.99)}),
    ("amsgrad", torch.optim.AdamW, {"amsgrad": True}),
    ("sgdw", None, {}),
])
def test_decoupled_optimizer_decays_by_itself_in_a_plain_loop(name: str, torch_cls: type | None, kwargs: dict) -> None:
    """No callback: the optimizer built in decoupled mode decays inside step(), as torch.optim.AdamW does."""
    lr, wd = 1e-2, 0.1
    ours, theirs = mlp().double(), mlp().double()
    opt = OptimizerConfig(name, lr=lr, weight_decay=wd, wd_mode="decoupled", kwargs=kwargs).build(ours)
    if torch_cls is None:  # SGD + decoupled decay written out: w <- w - lr * wd * w, then momentum SGD
        ref = torch.optim.SGD(theirs.parameters(), lr=lr, momentum=0.9)

        @torch.no_grad()
        def decay(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for p in theirs.parameters():
                p.mul_(1 - lr * wd)

        ref.register_step_pre_hook(decay)
    else:
        ref = torch_cls(theirs.parameters(), lr=lr, weight_decay=wd, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        for net, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            net(x).square().mean().backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_decoupled_decay_runs_after_the_closure() -> None:
    """With a closure (Lightning's way) the decay comes after backward, so gradients are taken at undecayed weights."""
    lr, wd = 0.1, 0.5
    ours, theirs = mlp().double(), mlp().double()
    opt = OptimizerConfig("adamw", lr=lr, weight_decay=wd).build(ours)
    ref = torch.optim.AdamW(theirs.parameters(), lr=lr, weight_decay=wd)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for net, o in ((ours, opt), (theirs, ref)):
        def closure(net: nn.Module = net, o: torch.optim.Optimizer = o) -> torch.Tensor:
            o.zero_grad()
            loss = net(x).square().mean()
            loss.backward()
            return loss
        for _ in range(3):
            o.step(closure)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_bad_params_argument() -> None:
    with pytest.raises(TypeError, match="module, a list of modules"):
        param_groups(["not a module"], lr=1e-3)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="No parameters"):
        param_groups(nn.ReLU(), lr=1e-3)
