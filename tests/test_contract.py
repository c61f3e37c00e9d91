"""The datamodule contract (datamodules/contract.py): the zoo's datamodules implement it, a user's own datamodule with
the same members works with the zoo's models, and a missing member is named when the run starts."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_adamw import OptimizerConfig
from lightning_adamw.cli import import_zoo

import_zoo(Path(__file__).resolve().parents[1])

from datamodules.cars import StanfordCarsDataModule  # noqa: E402
from datamodules.cifar10 import CIFAR10DataModule  # noqa: E402
from datamodules.contract import (  # noqa: E402
    IGNORE_INDEX,
    AugmentedEvaluation,
    ClassificationData,
    TokenData,
    TrainImages,
    rank_world,
    require,
)
from datamodules.wikitext2 import WikiText2  # noqa: E402
from models.airbench import AirbenchNet  # noqa: E402
from models.awd_lstm import AWDLSTM  # noqa: E402
from models.classifier import ImageClassifier  # noqa: E402
from models.language_model import LanguageModel  # noqa: E402


@pytest.mark.parametrize(("datamodule", "protocols"), [
    (CIFAR10DataModule, (ClassificationData, AugmentedEvaluation, TrainImages)),
    (StanfordCarsDataModule, (ClassificationData, AugmentedEvaluation)),
    (WikiText2, (TokenData,)),
])
def test_zoo_datamodules_implement_their_protocols(datamodule: type, protocols: tuple[type, ...],
                                                   tmp_path: Path) -> None:
    instance = datamodule(data_dir=str(tmp_path))  # before setup: the members exist, their values come later
    for protocol in protocols:
        assert require(instance, protocol, "test", "fix") is instance


def test_ignore_index_is_the_one_the_loss_skips() -> None:
    logits, targets = torch.randn(3, 5), torch.tensor([1, IGNORE_INDEX, 4])
    assert torch.equal(torch.nn.functional.cross_entropy(logits, targets),
                       torch.nn.functional.cross_entropy(logits[[0, 2]], targets[[0, 2]]))


def test_require_names_the_member_the_reader_and_the_fix() -> None:
    class Partial:
        num_classes = 3

    with pytest.raises(MisconfigurationException) as error:
        require(Partial(), AugmentedEvaluation, "ImageClassifier(tta=True)", "or set tta=false")
    message = str(error.value)
    for part in ("ImageClassifier(tta=True) reads tta_augment", "(Partial) has none", "or set tta=false"):
        assert part in message
    with pytest.raises(MisconfigurationException, match="bare dataloaders"):
        require(None, TrainImages, "AirbenchNet", "fix")


def test_rank_world_without_a_trainer_is_one_process() -> None:
    assert rank_world(None) == (0, 1)


class UserImages(pl.LightningDataModule):
    """A user's datamodule that inherits nothing from the zoo but has the contract's members."""

    num_classes = 10

    def __init__(self, with_train_images: bool = True) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(64, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 10, (64,), generator=generator)
        if with_train_images:
            self.train_images = lambda n=None: self.images[:n]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(zip(self.images, self.labels)), batch_size=32)

    def tta_augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return images.flip(-1)


def tiny_airbench_classifier() -> ImageClassifier:
    net = AirbenchNet(widths=(8, 16, 16), init_images=32)
    return ImageClassifier(net, OptimizerConfig("sgd", lr=0.1, momentum=0.9), tta=True)


def fit(tmp_path: Path, model: pl.LightningModule, data: pl.LightningDataModule) -> pl.Trainer:
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, data)
    return trainer


def test_a_users_datamodule_with_the_members_trains_a_zoo_model(tmp_path: Path) -> None:
    model = tiny_airbench_classifier()
    fit(tmp_path, model, UserImages())
    assert model.net.data_initialized  # the whitening was fitted through the user's train_images


def test_a_missing_member_is_named_when_the_run_starts(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="AirbenchNet, fitted to the training images, reads "
                                                        "train_images from the datamodule"):
        fit(tmp_path, tiny_airbench_classifier(), UserImages(with_train_images=False))


class UserTokens(pl.LightningDataModule):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(0, self.vocab_size, (9, 2), generator=torch.Generator().manual_seed(0))
        return DataLoader([(ids[:-1], ids[1:], 8)], batch_size=None)  # one (time, batch) window of bptt 8


def tiny_language_model(vocab_size: int | None) -> LanguageModel:
    network = partial(AWDLSTM, emb_size=8, hidden_size=8, num_layers=2)
    return LanguageModel(network, vocab_size=vocab_size, optimizer=OptimizerConfig("adam", lr=1e-3))


def test_the_language_model_takes_the_vocabulary_size_from_the_datamodule(tmp_path: Path) -> None:
    model = tiny_language_model(None)
    fit(tmp_path, model, UserTokens(vocab_size=13))
    assert model.network.vocab_size == 13 and model.hparams["vocab_size"] == 13


def test_a_vocabulary_size_that_disagrees_with_the_datamodule_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"LanguageModel\(vocab_size=12\) but the datamodule's vocabulary has 13"):
        fit(tmp_path, tiny_language_model(12), UserTokens(vocab_size=13))
