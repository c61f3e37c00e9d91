"""The ``muon`` registry entry: MuonAdamW against torch's own Muon and AdamW, the automatic split, conv kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import TinyRegression, loader, make_net, oracle_loop, trainer
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR

from lightning_adamw import OneCycleWD, OptimizerConfig
from lightning_adamw.muon import USE_MUON_KEY, MuonAdamW, muon_split
from models.awd_lstm import AWDLSTM
from models.qrnn import AWDQRNN
from models.resnet_cars import CarsResNet50
from models.wrn import WideResNet

EPOCHS, STEPS = 7, 56


def test_onecycle_decay_with_muon_equals_torch_muon_and_adamw_own_decay() -> None:
    """OneCycleWD owning the decay == torch.optim.Muon (hidden matrix) + torch.optim.AdamW (rest), each decaying
    itself, under OneCycleLR (lr and momentum / beta1 cycled)."""
    lr, wd, betas = 3e-3, 0.1, (0.9, 0.99)
    model = TinyRegression(OptimizerConfig("muon", lr=lr, weight_decay=wd, betas=betas))
    trainer(max_epochs=EPOCHS, callbacks=[OneCycleWD()]).fit(model, loader())

    net = make_net()
    hidden, rest = [net[0].weight], [net[0].bias, net[2].weight, net[2].bias]  # net[2]: the output layer
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=lr, betas=betas, weight_decay=wd)
    schedulers = [OneCycleLR(muon, max_lr=lr, total_steps=STEPS), OneCycleLR(adamw, max_lr=lr, total_steps=STEPS)]

    class Both:
        def zero_grad(self, set_to_none: bool = True) -> None:
            muon.zero_grad(set_to_none), adamw.zero_grad(set_to_none)

        def step(self, closure: None = None) -> None:
            muon.step(), adamw.step()

    class BothSchedulers:
        def step(self) -> None:
            for s in schedulers:
                s.step()

    oracle_loop(net, Both(), BothSchedulers(), EPOCHS)
    for (name, a), b in zip(model.net.named_parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)
    assert not torch.equal(model.net[0].weight, make_net()[0].weight)


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_kernel_step_equals_torch_muon_on_the_flattened_matrix(channels_last: bool) -> None:
    torch.manual_seed(0)
    kernel = nn.Parameter(torch.randn(6, 3, 3, 3, dtype=torch.float64))
    if channels_last:
        kernel = nn.Parameter(kernel.detach().to(memory_format=torch.channels_last))
        assert not kernel.is_contiguous()
    matrix = nn.Parameter(kernel.detach().reshape(6, -1).clone())
    ours = MuonAdamW([kernel], lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    oracle = torch.optim.Muon([matrix], lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    assert ours.param_groups[0][USE_MUON_KEY]
    for step in range(4):
        grad = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        kernel.grad, matrix.grad = grad.clone(), grad.reshape(6, -1).clone()
        ours.step()
        oracle.step()
    torch.testing.assert_close(kernel.detach().reshape(6, -1), matrix.detach(), rtol=0, atol=0)
    assert not torch.equal(matrix.detach(), kernel.detach().reshape(6, -1) * 0)


def test_bare_tensors_are_split_by_dimension_and_groups_must_not_mix() -> None:
    w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.zeros(4))
    opt = MuonAdamW([w, b])
    assert [(g[USE_MUON_KEY], len(g["params"])) for g in opt.param_groups] == [(True, 1), (False, 1)]
    assert "momentum" in opt.param_groups[0] and "betas" not in opt.param_groups[0]
    assert "betas" in opt.param_groups[1] and "momentum" not in opt.param_groups[1]
    with pytest.raises(ValueError, match="mixes matrices and vectors"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2)), nn.Parameter(torch.randn(2))]})
    with pytest.raises(ValueError, match="Muon updates matrices and conv kernels only"):
        MuonAdamW([{"params": [b], USE_MUON_KEY: True}])


def _groups(optimizer: torch.optim.Optimizer) -> dict[int, bool]:
    seen: dict[int, bool] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in seen, "a parameter is in two groups"
            seen[id(p)] = group[USE_MUON_KEY]
    return seen


def _assert_covers_every_parameter_once(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, bool]:
    seen = _groups(optimizer)
    assert set(seen) == {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        if group[USE_MUON_KEY]:
            assert all(p.ndim >= 2 for p in group["params"])
    return seen


@pytest.mark.parametrize("exclude_bias_and_norm", [False, True])
def test_split_on_wide_resnet_covers_every_parameter_once(exclude_bias_and_norm: bool) -> None:
    net = WideResNet(depth=10, width=1, num_classes=10)
    opt = OptimizerConfig("muon", lr=1e-3, weight_decay=0.1,
                          exclude_bias_and_norm=exclude_bias_and_norm).build(net.layer_groups())
    use_muon = _assert_covers_every_parameter_once(net, opt)
    head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    for module in net.modules():
        for p in module.parameters(recurse=False):
            expected = isinstance(module, nn.Conv2d)  # every conv kernel; not the head, biases or BatchNorm
            assert use_muon[id(p)] == expected, (type(module).__name__, tuple(p.shape))
    assert not use_muon[id(head.weight)]


def test_split_on_cars_layer_groups_keeps_the_head_linear_in_adamw() -> None:
    net = CarsResNet50(num_classes=196, weights=None)
    opt = OptimizerConfig("muon", lr=[1e-3, 2e-3, 3e-3], weight_decay=1e-3).build(net.layer_groups())
    use_muon = _assert_covers_every_parameter_once(net, opt)
    classifier = [m for m in net.head.modules() if isinstance(m, nn.Linear)][-1]
    assert classifier.out_features == 196 and not use_muon[id(classifier.weight)]
    assert all(use_muon[id(m.weight)] for m in net.modules() if isinstance(m, nn.Conv2d))
    # discriminative lrs survive the split: each (layer group, method) pair is a group with its layer group's lr
    for group in opt.param_groups:
        assert group["lr"] == [1e-3, 2e-3, 3e-3][group["layer_group"]]


@pytest.mark.parametrize("network", [AWDLSTM, AWDQRNN])
def test_split_on_language_models_keeps_embedding_and_tied_decoder_in_adamw(network: type) -> None:
    net = network(vocab_size=50, emb_size=8, hidden_size=12, num_layers=2, dropout_weight=0.3)
    opt = OptimizerConfig("muon", lr=1e-3).build(net)
    use_muon = _assert_covers_every_parameter_once(net, opt)
    assert not use_muon[id(net.embedding.weight)]  # also the tied decoder's weight
    recurrent = [(n, p) for n, p in net.named_parameters() if p.ndim >= 2 and p is not net.embedding.weight]
    assert recurrent and all(use_muon[id(p)] for _, p in recurrent), [n for n, p in recurrent if not use_muon[id(p)]]
    assert any("original" in n for n, _ in recurrent)  # weight-dropped matrices are found through parametrize


def test_untied_decoder_goes_to_adamw() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(30, 8)
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
            self.lm_head = nn.Linear(8, 30)

    lm = LM()
    use_muon = _assert_covers_every_parameter_once(lm, OptimizerConfig("muon").build(lm))
    assert [use_muon[id(m.weight)] for m in (lm.mlp[0], lm.mlp[2], lm.lm_head)] == [True, True, False]
    assert not use_muon[id(lm.embed.weight)]


def test_split_overrides_by_name() -> None:
    net = make_net()
    config = OptimizerConfig("muon", kwargs={"muon_params": ["2.weight"], "adamw_params": ["0.*"]})
    use_muon = _assert_covers_every_parameter_once(net, config.build(net))
    assert not use_muon[id(net[0].weight)] and use_muon[id(net[2].weight)]
    with pytest.raises(ValueError, match="matches no parameter; names look like"):
        OptimizerConfig("muon", kwargs={"adamw_params": ["encoder.*"]}).build(net)
    with pytest.raises(ValueError, match="Muon updates matrices and conv kernels only"):
        OptimizerConfig("muon", kwargs={"muon_params": ["0.bias"]}).build(net)
    with pytest.raises(ValueError, match="both muon_params and adamw_params"):
        OptimizerConfig("muon", kwargs={"muon_params": ["0.weight"], "adamw_params": ["0.*"]}).build(net)
    with pytest.raises(ValueError, match="does not take.*adamw_params"):
        OptimizerConfig("muon", kwargs={"adamw_param": ["0.*"]}).build(net)


def test_muon_has_no_l2_mode() -> None:
    with pytest.raises(ValueError, match="has no L2 weight decay"):
        OptimizerConfig("muon", wd_mode="l2")


def test_muon_trains_a_small_convnet() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean(dim=(1, 2)) > 0).long()
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    opt = OptimizerConfig("muon", lr=1e-2).build(net)
    before = nn.functional.cross_entropy(net(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert nn.functional.cross_entropy(net(x), y).item() < 0.5 * before


def test_state_dict_round_trip_continues_exactly() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 3)).double()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))

    def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    opt = OptimizerConfig("muon", lr=1e-2, weight_decay=0.0).build(net)
    run(net, opt, 3)
    net2 = copy.deepcopy(net)
    opt2 = OptimizerConfig("muon", lr=1e-2, weight_decay=0.0).build(net2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(net, opt, 3)
    run(net2, opt2, 3)
    for a, b in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert {"momentum_buffer"} <= set(opt2.state[net2[0].weight]) and "exp_avg" in opt2.state[net2[2].weight]


def test_split_function_alone() -> None:
    net = make_net()
    use = muon_split([net])
    assert use("0.weight", net[0].weight) == {USE_MUON_KEY: True}
    assert use("2.weight", net[2].weight) == {USE_MUON_KEY: False}
    assert use("0.bias", net[0].bias) == {USE_MUON_KEY: False}


def test_decay_happens_once_whoever_owns_it() -> None:
    # the optimizer's own decay and OneCycleWD's together are refused, whichever way round
    own = TinyRegression(lambda params: MuonAdamW(params, lr=1e-3, weight_decay=0.1))
    with pytest.raises(Exception, match="decay must happen once"):
        trainer(max_steps=1, callbacks=[OneCycleWD(weight_decay=0.1)]).fit(own, loader())
    # registry + decoupled mode: the groups hand their decay to the callback and the optimizer's own is zero
    opt = OptimizerConfig("muon", weight_decay=0.1).build(make_net())
    assert all(g["weight_decay"] == 0.0 and g["decoupled_wd"] == 0.1 for g in opt.param_groups)
    # without a callback the registry's decay still happens once per step: an idle weight decays as (1 - lr*wd)^n
    net = make_net()
    idle = nn.Parameter(torch.ones(3, 3, dtype=torch.float64))
    opt = OptimizerConfig("muon", lr=1e-2, weight_decay=0.1).build([net, nn.ParameterList([idle])])
    for _ in range(3):
        opt.zero_grad()
        (net(torch.ones(2, 8, dtype=torch.float64)).sum() + 0.0 * idle.sum()).backward()
        opt.step()
    torch.testing.assert_close(idle.detach(), torch.full((3, 3), (1 - 1e-2 * 0.1) ** 3, dtype=torch.float64))
