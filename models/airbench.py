"""The airbench94 network: a patch-whitened VGG-like convnet that trains CIFAR-10 to 94% in about 10 epochs.

Source: K. Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU" (arXiv:2404.00498) and the hyperparameters its
scripts publish (github.com/KellerJordan/cifar10-airbench, airbench94); written here from that description.

* A 2x2 convolution without padding whose 24 filters are the eigenvectors of the training images' 2x2-patch
  covariance and their negatives, each scaled by ``1 / sqrt(eigenvalue + eps)``: frozen (a buffer, so it is saved in
  checkpoints but never trained); its bias is trained for the first ``whiten_bias_epochs`` epochs only.
* GELU, then three groups of 64/256/256 channels, each ``conv3x3, max-pool 2, BatchNorm, GELU, conv3x3, BatchNorm,
  GELU``; convolutions without bias, identity (dirac) initialised in their first in-channels; BatchNorm weights
  frozen at 1 (only the biases train).
* A final max-pool 3 (3x3 -> 1x1), and a linear head without bias whose output is scaled by ``head_scale``.

``AirbenchNet()`` is that network (1.97 M parameters). The whitening needs the training images: ``ImageClassifier``
calls :meth:`AirbenchNet.init_from_data` in ``on_fit_start`` with ``init_images`` normalised training images from
the datamodule, unless the weights came from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 convolution with padding 1, no bias, identity (dirac) initialised in its first ``in_channels`` filters.

    The other filters keep torch's default initialisation (airbench: "partial identity initialization").
    """
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:in_channels])
    return conv


def batch_norm(channels: int, momentum: float, eps: float) -> nn.BatchNorm2d:
    """BatchNorm whose weight is frozen at 1: only its bias (the shift) is trained."""
    norm = nn.BatchNorm2d(channels, momentum=momentum, eps=eps)
    norm.weight.requires_grad_(False)
    return norm


class PatchWhitening(nn.Module):
    """A frozen 2x2 (``kernel_size``) convolution that whitens image patches, with a trainable bias.

    Its ``2 * C * k * k`` filters are ``+-v_i / sqrt(lambda_i + eps)`` for the eigenpairs ``(lambda_i, v_i)`` of the
    covariance of all ``k x k`` patches of the images given to :meth:`fit` (largest eigenvalue first): on those
    images the first ``C * k * k`` outputs have covariance ``diag(lambda / (lambda + eps))``, the identity up to
    ``eps``. The filters are a buffer (saved, never trained); ``fitted`` records whether :meth:`fit` ran.

    Args:
        in_channels: image channels.
        kernel_size: patch size (airbench: 2).
        eps: added to the eigenvalues before the inverse square root (airbench: 5e-4).
    """

    def __init__(self, in_channels: int = 3, kernel_size: int = 2, eps: float = 5e-4) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"PatchWhitening eps must be > 0 (it bounds the gain on flat directions), got {eps}.")
        self.out_channels = 2 * in_channels * kernel_size ** 2
        self.eps = eps
        self.register_buffer("weight", torch.zeros(self.out_channels, in_channels, kernel_size, kernel_size))
        self.register_buffer("fitted", torch.tensor(False))
        self.bias = nn.Parameter(torch.zeros(self.out_channels))

    @torch.no_grad()
    def fit(self, images: Tensor, chunk: int = 1000) -> Tensor:
        """Set the filters from ``(N, C, H, W)`` images; returns the patch covariance's eigenvalues, descending.

        The covariance is accumulated in float64 over chunks of ``chunk`` images, so memory stays small.
        """
        c, k = self.weight.shape[1], self.weight.shape[2]
        if images.ndim != 4 or images.shape[1] != c:
            raise ValueError(f"PatchWhitening.fit expects (N, {c}, H, W) images, got shape {tuple(images.shape)}.")
        dim = c * k * k
        total = torch.zeros(dim, dtype=torch.float64, device=images.device)
        outer = torch.zeros(dim, dim, dtype=torch.float64, device=images.device)
        count = 0
        for start in range(0, len(images), chunk):
            # (n, C*k*k, L) in the (C, kh, kw) order of a conv weight's last three axes
            patches = F.unfold(images[start:start + chunk].double(), k).transpose(1, 2).reshape(-1, dim)
            total += patches.sum(0)
            outer += patches.T @ patches
            count += len(patches)
        mean = total / count
        covariance = outer / count - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        filters = (eigenvectors / (eigenvalues.clamp_min(0) + self.eps).sqrt()).T.reshape(dim, c, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))
        self.fitted.fill_(True)
        return eigenvalues

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias)


class ConvGroup(nn.Module):
    """``conv3x3, max-pool 2, BatchNorm, GELU, conv3x3, BatchNorm, GELU``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of both convolutions' outputs.
        bn_momentum: torch's BatchNorm momentum (the weight of the new batch statistics).
        bn_eps: BatchNorm epsilon.
    """

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float, bn_eps: float) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = batch_norm(out_channels, bn_momentum, bn_eps)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.norm2 = batch_norm(out_channels, bn_momentum, bn_eps)
        self.activation = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.activation(self.norm1(self.pool(self.conv1(x))))
        return self.activation(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """The airbench94 network for 32x32 images (see the module docstring).

    Args:
        widths: channels of the three conv groups (airbench94: 64, 256, 256).
        num_classes: outputs of the head.
        head_scale: factor on the head's output (airbench94: 1/9).
        bn_momentum: torch's BatchNorm momentum; airbench writes 0.6 for the weight of the running average, torch's
            momentum is the weight of the new batch: ``1 - 0.6 = 0.4``.
        bn_eps: BatchNorm epsilon (airbench: 1e-12).
        whiten_eps: the whitening's eigenvalue offset (airbench: 5e-4).
        whiten_bias_epochs: epochs during which the whitening bias trains; frozen after (airbench94: 3).
        init_images: how many training images (the first of the training split, unaugmented) the whitening is
            fitted on (airbench: 5000).

    Example::

        net = AirbenchNet()                                  # airbench94, 1.97 M parameters
        tiny = AirbenchNet(widths=(8, 16, 16))               # for tests
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 256, 256),
        num_classes: int = 10,
        head_scale: float = 1 / 9,
        bn_momentum: float = 0.4,
        bn_eps: float = 1e-12,
        whiten_eps: float = 5e-4,
        whiten_bias_epochs: int = 3,
        init_images: int = 5000,
    ) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"AirbenchNet widths must be three positive channel counts, got {list(widths)}.")
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(
                f"bn_momentum is torch's (the new batch's weight) and must lie in (0, 1], got {bn_momentum}; "
                "airbench's 0.6 is torch's 0.4."
            )
        if whiten_bias_epochs < 0 or init_images < 1 or num_classes < 1:
            raise ValueError(
                f"AirbenchNet needs whiten_bias_epochs >= 0, init_images >= 1 and num_classes >= 1, got "
                f"{whiten_bias_epochs}, {init_images}, {num_classes}."
            )
        self.num_classes = num_classes
        self.head_scale = head_scale
        self.whiten_bias_epochs = whiten_bias_epochs
        self.init_images = init_images
        self.whiten = PatchWhitening(3, 2, whiten_eps)
        self.activation = nn.GELU()
        channels = [self.whiten.out_channels, *widths]
        self.groups = nn.Sequential(*(ConvGroup(i, o, bn_momentum, bn_eps) for i, o in zip(channels, channels[1:])))
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.groups(self.activation(self.whiten(x))))
        return self.head(x.flatten(1)) * self.head_scale

    @property
    def data_initialized(self) -> bool:
        """Whether the whitening has been fitted (by :meth:`init_from_data` or loaded from a checkpoint)."""
        return bool(self.whiten.fitted)

    def init_from_data(self, images: Tensor) -> None:
        """Fit the whitening on normalised ``(N, 3, H, W)`` training images."""
        self.whiten.fit(images)

    def set_epoch(self, epoch: int) -> None:
        """Train the whitening bias during the first ``whiten_bias_epochs`` epochs only."""
        self.whiten.bias.requires_grad_(epoch < self.whiten_bias_epochs)

    def norm_biases(self) -> nn.ModuleList:
        """The BatchNorm layers (their trainable parameters are the biases; airbench gives them 64x the lr)."""
        return nn.ModuleList(m for m in self.modules() if isinstance(m, nn.BatchNorm2d))

    def layer_groups(self) -> list[nn.Module]:
        """``[BatchNorm layers, the whole network]``: the registry puts a parameter in the first group holding it,
        so a config gives the BatchNorm biases their own lr and weight decay (``lr: [lr_bn, lr]``)."""
        return [self.norm_biases(), self]
