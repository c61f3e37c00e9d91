"""ResNet-50 with fastai's classification head: the Stanford Cars fine-tuning model of the 2018 study.

Source: RECIPES.md ("Models"), after fastai 0.7
``ConvLearner.pretrained(resnet50, ..., xtra_fc=[512], ps=[0.25, 0.5])``: torchvision's ResNet-50 body, then
``AdaptiveConcatPool2d -> BN -> Dropout 0.25 -> Linear 4096->512 -> ReLU -> BN -> Dropout 0.5 -> Linear 512->196``,
in three layer groups (stem..layer2, layer3..layer4, head) for discriminative learning rates and ``FreezeUnfreeze``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights, resnet50


class AdaptiveConcatPool2d(nn.Module):
    """Adaptive max and average pooling to ``output_size``, concatenated on the channels (max first, as fastai)."""

    def __init__(self, output_size: int = 1) -> None:
        super().__init__()
        self.max = nn.AdaptiveMaxPool2d(output_size)
        self.avg = nn.AdaptiveAvgPool2d(output_size)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.max(x), self.avg(x)], dim=1)


def load_resnet50_state_dict(weights: str) -> dict[str, Tensor]:
    """The state dict of torchvision's ResNet-50 for ``weights``: a ``ResNet50_Weights`` name or a local file.

    A name is fetched through torchvision (and its cache in ``$TORCH_HOME/hub/checkpoints``); offline, the error
    says where to put the file or how to pass it. A file must hold a ``torchvision.models.resnet50`` state dict,
    such as the ``.pth`` file torchvision downloads.
    """
    names = list(ResNet50_Weights.__members__)
    if weights not in names:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ValueError(
                f"weights={weights!r} is neither a torchvision ResNet50_Weights name ({', '.join(names)}) nor an "
                "existing file. Pass a name, the path to a torchvision ResNet-50 state dict (.pth), or null to "
                "train from scratch."
            )
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"Could not read ResNet-50 weights from {path}: {err}") from err
    entry = ResNet50_Weights[weights]
    try:
        return entry.get_state_dict(progress=False, check_hash=True)
    except OSError as err:
        file_name = entry.url.rsplit("/", 1)[-1]
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(
            f"Could not download torchvision's ResNet-50 weights {weights} from {entry.url} ({err}); this machine "
            f"looks offline. Download {file_name} on a machine with internet, then either pass its path "
            f"(model.init_args.net.init_args.weights: /path/to/{file_name}) or copy it into {cache}/, where "
            "torchvision looks first. Or set weights: null to train from scratch."
        ) from err


class CarsResNet50(nn.Module):
    """ResNet-50 body with fastai's head, in three layer groups.

    Args:
        num_classes: outputs (Stanford Cars: 196).
        weights: torchvision ``ResNet50_Weights`` name (``IMAGENET1K_V1``: the ImageNet weights torchvision had in
            2018, which the study fine-tuned; ``IMAGENET1K_V2`` is newer and stronger), or a path to a local
            torchvision ResNet-50 state dict, or ``None`` to train from scratch. The strings ``"none"`` and ``"null"``
            also mean ``None``: a nested command-line override (``--model.init_args.net.init_args.weights null``)
            reaches the constructor as the string ``"None"`` (jsonargparse 4.53).
        hidden: width of the head's hidden layer (512).
        dropout: dropout before the hidden and the final linear layer (0.25, 0.5).

    Example::

        net = CarsResNet50(weights="/data/resnet50-0676ba61.pth")
    """

    def __init__(
        self,
        num_classes: int = 196,
        weights: str | None = "IMAGENET1K_V1",
        hidden: int = 512,
        dropout: tuple[float, float] = (0.25, 0.5),
    ) -> None:
        super().__init__()
        body = resnet50(weights=None)
        if weights is not None and weights.lower() not in ("none", "null"):
            state = load_resnet50_state_dict(weights)
            try:
                body.load_state_dict(state)
            except RuntimeError as err:
                raise ValueError(
                    f"weights={weights!r} does not hold a torchvision ResNet-50 state dict (the keys or shapes "
                    f"differ): {err}"
                ) from err
        self.num_classes = num_classes
        self.stem_layer2 = nn.Sequential(body.conv1, body.bn1, body.relu, body.maxpool, body.layer1, body.layer2)
        self.layer3_layer4 = nn.Sequential(body.layer3, body.layer4)
        features = 2 * body.fc.in_features
        self.head = nn.Sequential(
            AdaptiveConcatPool2d(),
            nn.Flatten(),
            nn.BatchNorm1d(features),
            nn.Dropout(dropout[0]),
            nn.Linear(features, hidden),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden),
            nn.Dropout(dropout[1]),
            nn.Linear(hidden, num_classes),
        )
        # fastai 0.7 initialises the new head's linear layers with kaiming_normal and zero bias
        for module in self.head:
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer3_layer4(self.stem_layer2(x)))

    def layer_groups(self) -> list[nn.Module]:
        """stem..layer2, layer3..layer4, head (fastai's split of ResNet-50)."""
        return [self.stem_layer2, self.layer3_layer4, self.head]
