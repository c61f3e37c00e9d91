"""Wide ResNet as fastai's CIFAR-10 DAWNBench network (WRN-22, k=6): the CIFAR-10 model of the 2018 study.

Source: fastai 0.7 ``fastai/models/cifar10/wideresnet.py`` (``wrn_22``), as summarised in RECIPES.md ("Models"):
pre-activation basic blocks whose residual branch is scaled by 0.2, widths 16 -> 96/192/384, convolutions without
bias, head ``bn, relu, global average pool, linear``. ``WideResNet()`` with the defaults is that network
(9.66 M parameters); ``depth`` and ``width`` shrink it for tests and CPU runs.

fastai's block applies its shortcut to the activated input ``relu(bn(x))``, also where the shape does not change (its
shortcut is then a no-op on the activated input), so such a block returns ``relu(bn(x)) + 0.2 * branch``.
``shortcut="identity"`` gives the textbook pre-activation block of He et al. 2016 (``x + 0.2 * branch``) instead.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

#: What a block whose shape does not change adds its branch to: fastai's activated input, or the raw input.
Shortcut = Literal["activated", "identity"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (fastai ``conv_2d(ni, nf, 3, stride)``)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias: the shortcut when the shape changes."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``x2 = relu(bn(x))``, ``out = shortcut(x2) + scale * conv(relu(bn(conv(x2))))``.

    The shortcut is a 1x1 convolution of ``x2`` when the shape changes (fastai changes it only with the channel
    count, which in WRN-22 is also where the stride is; a stride without a channel change gets one here too, so
    any ``width`` works). Otherwise it is ``x2`` itself (``shortcut="activated"``, fastai's block) or the raw input
    ``x`` (``shortcut="identity"``, He et al. 2016).

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first convolution (and of the shortcut).
        residual_scale: factor on the residual branch (fastai: 0.2).
        shortcut: what a block of unchanged shape adds its branch to: ``"activated"`` (``relu(bn(x))``, fastai 0.7
            ``wideresnet.py``) or ``"identity"`` (``x``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, residual_scale: float = 0.2,
                 shortcut: Shortcut = "activated") -> None:
        super().__init__()
        if shortcut not in ("activated", "identity"):
            raise ValueError(f"shortcut must be 'activated' (fastai's block) or 'identity', got {shortcut!r}.")
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            conv1x1(in_channels, out_channels, stride) if in_channels != out_channels or stride != 1 else None
        )
        self.residual_scale = residual_scale
        self.shortcut_from_input = shortcut == "identity"

    def forward(self, x: Tensor) -> Tensor:
        x2 = self.relu(self.bn1(x))
        if self.shortcut is not None:
            identity = self.shortcut(x2)
        else:
            identity = x if self.shortcut_from_input else x2
        out = self.conv1(x2)
        out = self.conv2(self.relu(self.bn2(out)))
        return identity + self.residual_scale * out


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` for 32x32 images, fastai's DAWNBench variant (see the module docstring).

    Args:
        depth: total depth ``6 * n + 4`` with ``n`` blocks in each of the three groups (22: n = 3).
        width: widening factor ``k``; the groups have ``16k``, ``32k``, ``64k`` channels (6: 96/192/384).
        num_classes: outputs of the final linear layer.
        stem_channels: channels of the first convolution (16).
        residual_scale: factor on every residual branch (0.2, fastai's DAWNBench WRN).
        shortcut: the shortcut of the blocks whose shape does not change: ``"activated"`` (fastai's, the study's
            network) or ``"identity"`` (the textbook pre-activation block); see :class:`PreActBlock`.

    Example::

        net = WideResNet()                   # WRN-22, 9.66 M parameters
        tiny = WideResNet(depth=10, width=1)  # one block per group, 16/32/64 channels
    """

    def __init__(
        self,
        depth: int = 22,
        width: int = 6,
        num_classes: int = 10,
        stem_channels: int = 16,
        residual_scale: float = 0.2,
        shortcut: Shortcut = "activated",
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6 * n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}.")
        if width < 1 or num_classes < 1 or stem_channels < 1:
            raise ValueError(
                f"WideResNet width, num_classes and stem_channels must be >= 1, got {width}, {num_classes}, "
                f"{stem_channels}."
            )
        blocks_per_group = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.num_classes = num_classes

        layers: list[nn.Module] = [conv3x3(3, stem_channels)]
        in_channels = stem_channels
        for out_channels, stride in zip(widths, (1, 2, 2)):
            for i in range(blocks_per_group):
                layers.append(PreActBlock(in_channels, out_channels, stride if i == 0 else 1, residual_scale,
                                          shortcut))
                in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_channels, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def layer_groups(self) -> list[nn.Module]:
        """One layer group, the whole network: the CIFAR-10 recipe trains it with a single lr."""
        return [self]

