"""ImageClassifier: losses and metrics against direct computations, and test-time augmentation (TTA)."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import OptimizerConfig
from lightning_adamw.cli import import_zoo

import_zoo(Path(__file__).resolve().parents[1])  # the zoo runs from the checkout: put it on sys.path

from datamodules.cifar10 import random_crop_flip  # noqa: E402
from models.classifier import TTA_SEED, ImageClassifier  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


class TinyConv(nn.Module):
    """A small deterministic CNN (no BatchNorm, no dropout) with the zoo's network interface."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def layer_groups(self) -> list[nn.Module]:
        return [self.body, self.head]


class ConstantNet(nn.Module):
    """Ignores its input: the same logits for every image."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(-1.0, 2.0, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1)

    def layer_groups(self) -> list[nn.Module]:
        return [self]


class BrightnessNet(nn.Module):
    """Reads the class from the mean value of the image; records whether it ran in training mode."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.modes: set[bool] = set()

    def forward(self, x: Tensor) -> Tensor:
        self.modes.add(self.training)
        return -self.scale * (x.mean(dim=(1, 2, 3))[:, None] - torch.arange(10.0)) ** 2

    def layer_groups(self) -> list[nn.Module]:
        return [self]


class TensorData(pl.LightningDataModule):
    """Validation and test batches from tensors, with CIFAR-10's augmentation for TTA."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int = 16) -> None:
        super().__init__()
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def tta_augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return random_crop_flip(images, generator)


def random_data(n: int = 40, seed: int = 0) -> TensorData:
    gen = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def trainer(tmp_path: Path, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def test_tta_of_a_model_that_ignores_its_input_equals_the_plain_prediction(tmp_path: Path) -> None:
    model = ImageClassifier(ConstantNet(), tta=True)
    data = random_data()
    trainer(tmp_path).validate(model, data, verbose=False)
    images = data.images[:8]
    logits = model(images)
    torch.testing.assert_close(model.tta_probabilities(images, logits), logits.softmax(-1))
    metrics = trainer(tmp_path).test(model, data, verbose=False)[0]
    assert metrics["test/acc_tta"] == metrics["test/acc"]


def test_tta_is_mean_softmax_of_clean_and_augmented_passes_and_repeats(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(TinyConv(), tta=True, tta_passes=3)
    data = random_data(n=40)
    first = trainer(tmp_path).validate(model, data, verbose=False)[0]
    second = trainer(tmp_path).validate(model, data, verbose=False)[0]
    assert first == second

    # direct computation: batches of 16 in order, draws from a generator seeded as ImageClassifier seeds it
    gen = torch.Generator().manual_seed(TTA_SEED)
    net = model.net.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, 40, 16):
            x, y = data.images[start:start + 16], data.labels[start:start + 16]
            passes = [net(x)] + [net(random_crop_flip(x, gen)) for _ in range(3)]
            probs = torch.stack([p.softmax(-1) for p in passes]).mean(0)
            correct += int((probs.argmax(-1) == y).sum())
    assert first["val/acc_tta"] == pytest.approx(correct / 40)
    with torch.no_grad():
        logits = net(data.images)
    assert first["val/acc"] == pytest.approx(float((logits.argmax(-1) == data.labels).float().mean()))
    assert first["val/loss"] == pytest.approx(float(F.cross_entropy(logits, data.labels)), rel=1e-5)


def test_tta_keeps_predictions_in_label_order_and_runs_in_eval_mode(tmp_path: Path) -> None:
    # constant images whose value is the class: crops and flips keep the value, so TTA must be exact
    labels = torch.randperm(10 * 5, generator=torch.Generator().manual_seed(3)) % 10
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()
    net = BrightnessNet()
    metrics = trainer(tmp_path).validate(ImageClassifier(net, tta=True), TensorData(images, labels, 8),
                                         verbose=False)[0]
    assert metrics["val/acc"] == metrics["val/acc_tta"] == 1.0
    assert net.modes == {False}


class LoggedKeys(pl.Callback):
    """Records, at every validation, which metrics it logged."""

    def __init__(self) -> None:
        self.keys: list[set[str]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.keys.append(set(trainer.logged_metrics))


@pytest.mark.parametrize("limit", [{"max_epochs": 4}, {"max_steps": 12, "max_epochs": -1}])
def test_tta_last_epochs_computes_tta_only_in_the_final_validations_of_fit(
        tmp_path: Path, limit: dict[str, int]) -> None:
    data = random_data(n=48)  # 3 batches of 16: 3 steps per epoch, 4 epochs either way
    logged = LoggedKeys()
    model = ImageClassifier(TinyConv(), tta=True, tta_last_epochs=2)
    trainer(tmp_path, callbacks=[logged], **limit).fit(model, data)
    assert ["val/acc_tta" in keys for keys in logged.keys] == [False, False, True, True]
    assert all("val/acc" in keys for keys in logged.keys)
    # outside fit, TTA is always computed
    assert "val/acc_tta" in trainer(tmp_path).validate(model, data, verbose=False)[0]
    assert "test/acc_tta" in trainer(tmp_path).test(model, data, verbose=False)[0]


def test_tta_last_epochs_without_tta_is_refused() -> None:
    with pytest.raises(ValueError, match="tta_last_epochs=2 has no effect without tta=true"):
        ImageClassifier(TinyConv(), tta_last_epochs=2)
    with pytest.raises(ValueError, match="must be >= 1"):
        ImageClassifier(TinyConv(), tta=True, tta_last_epochs=0)


def test_training_loss_is_label_smoothed_cross_entropy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(TinyConv(), OptimizerConfig("adam", lr=[1e-3, 1e-2]), label_smoothing=0.1)
    data = random_data(n=16)
    expected = F.cross_entropy(copy.deepcopy(model.net)(data.images), data.labels, label_smoothing=0.1)
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fit.fit(model, data)
    assert float(fit.callback_metrics["train/loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    # the optimizer spans the network's layer groups, one lr each
    assert [(g["layer_group"], g["lr"]) for g in fit.optimizers[0].param_groups] == [(0, 1e-3), (1, 1e-2)]


def test_tta_needs_a_datamodule_with_tta_augment(tmp_path: Path) -> None:
    data = random_data()
    with pytest.raises(MisconfigurationException, match="tta_augment"):
        trainer(tmp_path).validate(ImageClassifier(TinyConv(), tta=True), data.val_dataloader(), verbose=False)


def test_network_must_expose_num_classes_and_layer_groups() -> None:
    with pytest.raises(TypeError, match="num_classes"):
        ImageClassifier(nn.Linear(3, 10))
    with pytest.raises(ValueError, match="tta_passes"):
        ImageClassifier(TinyConv(), tta_passes=0)
