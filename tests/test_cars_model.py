"""ResNet-50 with fastai's head: head layout, layer groups, and the three ways to get weights (name, file, none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet50

from lightning_adamw.cli import import_zoo

import_zoo(Path(__file__).resolve().parents[1])  # the zoo runs from the checkout: put it on sys.path

from models.resnet_cars import AdaptiveConcatPool2d, CarsResNet50  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def scratch() -> CarsResNet50:
    torch.manual_seed(0)
    return CarsResNet50(weights=None)


def test_head_is_fastai_head(scratch: CarsResNet50) -> None:
    kinds = [type(m) for m in scratch.head]
    assert kinds == [AdaptiveConcatPool2d, nn.Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU,
                     nn.BatchNorm1d, nn.Dropout, nn.Linear]
    bn1, drop1, fc1, bn2, drop2, fc2 = (scratch.head[i] for i in (2, 3, 4, 6, 7, 8))
    assert (bn1.num_features, drop1.p, fc1.in_features, fc1.out_features) == (4096, 0.25, 4096, 512)
    assert (bn2.num_features, drop2.p, fc2.in_features, fc2.out_features) == (512, 0.5, 512, 196)
    scratch.eval()
    with torch.no_grad():
        assert scratch(torch.zeros(2, 3, 64, 64)).shape == (2, 196)


def test_concat_pool_is_max_then_mean() -> None:
    x = torch.randn(2, 3, 5, 7)
    expected = torch.cat([x.amax(dim=(2, 3), keepdim=True), x.mean(dim=(2, 3), keepdim=True)], dim=1)
    torch.testing.assert_close(AdaptiveConcatPool2d()(x), expected)


def test_three_layer_groups_cover_every_parameter_once(scratch: CarsResNet50) -> None:
    groups = scratch.layer_groups()
    assert groups == [scratch.stem_layer2, scratch.layer3_layer4, scratch.head]
    ids = [id(p) for g in groups for p in g.parameters()]
    assert len(ids) == len(set(ids)) == len(list(scratch.parameters()))
    # stem..layer2 ends with torchvision's layer2 (512 channels), layer3..layer4 with layer4 (2048)
    assert scratch.stem_layer2[-1][-1].conv3.out_channels == 512
    assert scratch.layer3_layer4[-1][-1].conv3.out_channels == 2048


def test_local_weights_file_is_loaded(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save({k: v.half() for k, v in reference.state_dict().items()}, path)  # half: 50 MB instead of 100
    net = CarsResNet50(weights=str(path))
    torch.testing.assert_close(net.stem_layer2[0].weight, reference.conv1.weight.half().float())
    torch.testing.assert_close(net.layer3_layer4[1][2].conv3.weight, reference.layer4[2].conv3.weight.half().float())


def test_file_that_is_not_a_resnet50_state_dict_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ValueError, match="does not hold a torchvision ResNet-50 state dict"):
        CarsResNet50(weights=str(path))


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        CarsResNet50(weights="IMAGENET_V3")


def test_offline_download_says_how_to_pass_a_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: torchvision has to download
    with pytest.raises(RuntimeError) as err:
        CarsResNet50(weights="IMAGENET1K_V1")
    message = str(err.value)
    assert "Could not download" in message and "resnet50-0676ba61.pth" in message
    assert "weights: null" in message and str(tmp_path / "hub" / "checkpoints") in message


@pytest.mark.parametrize("weights", [None, "null", "None"], ids=["None", "str-null", "str-None"])
def test_no_weights_trains_from_scratch_without_the_network(weights: str | None) -> None:
    # the conftest makes any download attempt fail, so getting here proves none was made
    assert CarsResNet50(weights=weights).num_classes == 196
