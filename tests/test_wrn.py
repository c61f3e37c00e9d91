"""WRN-22 as fastai's DAWNBench network: parameter count, output shape, pre-activation block with a 0.2 branch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_adamw.cli import import_zoo

import_zoo(Path(__file__).resolve().parents[1])  # the zoo runs from the checkout: put it on sys.path

from models.wrn import PreActBlock, WideResNet  # noqa: E402


def test_wrn22_has_fastai_parameter_count_and_output_shape() -> None:
    net = WideResNet()
    # fastai wrn_22(): 9,658,458 parameters (RECIPES.md: "about 9.66 M")
    assert sum(p.numel() for p in net.parameters()) == 9_658_458
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    widths = [m.conv2.out_channels for m in net.features if isinstance(m, PreActBlock)]
    assert widths == [96] * 3 + [192] * 3 + [384] * 3
    assert all(not m.bias for m in net.modules() if isinstance(m, torch.nn.Conv2d))


def test_narrow_version_for_cpu_runs() -> None:
    net = WideResNet(depth=10, width=1, num_classes=7)
    blocks = [m for m in net.features if isinstance(m, PreActBlock)]
    assert [b.conv2.out_channels for b in blocks] == [16, 32, 64]
    assert net(torch.zeros(3, 3, 32, 32)).shape == (3, 7)
    assert net.layer_groups() == [net]


def test_block_is_preactivation_with_scaled_residual_branch() -> None:
    torch.manual_seed(0)
    block = PreActBlock(8, 16, stride=2).double().eval()
    for bn in (block.bn1, block.bn2):  # non-trivial statistics so that BN matters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)

    x2 = F.relu(bn_eval(block.bn1, x))
    shortcut = F.conv2d(x2, block.shortcut.weight, stride=2)
    branch = F.conv2d(x2, block.conv1.weight, stride=2, padding=1)
    branch = F.conv2d(F.relu(bn_eval(block.bn2, branch)), block.conv2.weight, padding=1)
    torch.testing.assert_close(block(x), shortcut + 0.2 * branch)


def bn_eval(m: torch.nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, training=False)


def test_unchanged_shape_block_adds_its_branch_to_the_activated_input_as_fastai() -> None:
    # fastai 0.7 wideresnet.py: the shortcut of a same-shape block is a no-op applied to x2 = relu(bn(x))
    torch.manual_seed(0)
    block = PreActBlock(8, 8, stride=1, residual_scale=0.0).double().eval()
    block.bn1.running_mean.uniform_(-1, 1)
    block.bn1.running_var.uniform_(0.5, 2)
    assert block.shortcut is None
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    x2 = F.relu(bn_eval(block.bn1, x))
    torch.testing.assert_close(block(x), x2)  # branch scaled to zero: relu(bn(x)), not the raw input
    block.residual_scale = 0.2
    branch = F.conv2d(F.relu(bn_eval(block.bn2, F.conv2d(x2, block.conv1.weight, padding=1))), block.conv2.weight,
                      padding=1)
    torch.testing.assert_close(block(x), x2 + 0.2 * branch)


def test_textbook_identity_shortcut_is_an_option() -> None:
    block = PreActBlock(8, 8, stride=1, residual_scale=0.0, shortcut="identity").eval()
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x), x)  # He et al. 2016: the raw input passes
    net = WideResNet(depth=10, width=1, shortcut="identity")
    assert all(b.shortcut_from_input for b in net.features if isinstance(b, PreActBlock))
    with pytest.raises(ValueError, match="'activated'"):
        PreActBlock(8, 8, shortcut="raw")  # type: ignore[arg-type]


def test_wrn22_is_the_studys_network_by_default() -> None:
    # 6 of WRN-22's 9 blocks keep their shape; by default every one of them adds to relu(bn(x))
    net = WideResNet()
    same_shape = [b for b in net.features if isinstance(b, PreActBlock) and b.shortcut is None]
    assert len(same_shape) == 6 and not any(b.shortcut_from_input for b in same_shape)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    textbook = WideResNet(shortcut="identity").eval()
    textbook.load_state_dict(net.state_dict())  # the same parameters: only the function differs
    assert not torch.allclose(net(x), textbook(x))


@pytest.mark.parametrize("depth", [9, 12, 4])
def test_depth_must_be_6n_plus_4(depth: int) -> None:
    with pytest.raises(ValueError, match=r"6 \* n \+ 4"):
        WideResNet(depth=depth)
