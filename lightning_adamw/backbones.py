"""Default layer groups (body first, head last) for common torchvision backbones, so a model need not write them.

fastai splits a pretrained CNN into three groups for discriminative lrs and gradual unfreezing: the early layers
(generic features), the late layers, and the head. For torchvision's ResNets that is ``stem..layer2``,
``layer3..layer4``, ``avgpool + fc`` (the Stanford Cars recipe of the 2018 study); EfficientNets and ConvNeXts are
split the same way at the middle of their ``features``.
"""

from __future__ import annotations

from torch import nn

_BACKBONES = ("ResNet", "EfficientNet", "ConvNeXt")


def _is_backbone(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torchvision.models") and type(module).__name__ in _BACKBONES


def _split(backbone: nn.Module) -> list[list[nn.Module]]:
    if type(backbone).__name__ == "ResNet":
        b = backbone
        return [[b.conv1, b.bn1, b.relu, b.maxpool, b.layer1, b.layer2], [b.layer3, b.layer4], [b.avgpool, b.fc]]
    features = list(backbone.features)
    half = len(features) // 2
    return [features[:half], features[half:], [backbone.avgpool, backbone.classifier]]


def _outside(module: nn.Module, backbone: nn.Module) -> list[nn.Module]:
    """The submodules of ``module`` with parameters that are not part of ``backbone`` (a separate head)."""
    found: list[nn.Module] = []
    for child in module.children():
        if child is backbone:
            continue
        if any(m is backbone for m in child.modules()):
            found += _outside(child, backbone)
        elif any(True for _ in child.parameters()):
            found.append(child)
    return found


def backbone_layer_groups(model: nn.Module) -> list[nn.Module]:
    """Three layer groups for the torchvision ResNet, EfficientNet or ConvNeXt in ``model``, body first.

    ``model`` is the backbone or holds exactly one (a LightningModule with ``self.net = resnet50()``). The head
    group holds the backbone's pooling and classifier plus every other module of ``model`` with parameters (a head
    of your own next to the backbone).

    Example::

        def configure_optimizers(self):
            return OptimizerConfig("adam", lr=1e-2).build(backbone_layer_groups(self))

    Raises:
        ValueError: ``model`` holds no such backbone, or more than one.
    """
    found = [m for m in model.modules() if _is_backbone(m)]
    if len(found) != 1:
        what = "no torchvision ResNet, EfficientNet or ConvNeXt" if not found else f"{len(found)} backbones"
        raise ValueError(
            f"{type(model).__name__} holds {what}, so it has no default layer split: give it a layer_groups() method "
            "returning its modules, body first and head last (e.g. [self.stem, self.blocks, self.head])."
        )
    groups = _split(found[0])
    head = [*groups[-1], *(_outside(model, found[0]) if model is not found[0] else [])]
    return [nn.ModuleList(g) for g in groups[:-1]] + [nn.ModuleList(head)]
