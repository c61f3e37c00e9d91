"""``ImageClassifier``: the LightningModule shared by the vision recipes (WRN-22 on CIFAR-10, ResNet-50 on Cars).

Cross-entropy (optionally label-smoothed), top-1 accuracy from torchmetrics, the optimizer from the plugin's registry
(the lr schedule and decoupled weight decay come from the ``OneCycleWD`` callback of the config), and test-time
augmentation (TTA) on validation and test.

TTA (RECIPES.md, "Models"): one clean pass plus ``tta_passes`` passes with the training augmentation, softmax
probabilities averaged, model in eval mode. The augmentation comes from the datamodule, which knows its data: it
provides ``tta_augment(images, generator) -> images``, the training augmentation applied on the device to a batch of
normalised evaluation images (``CIFAR10DataModule``: reflect-pad crop and flip; ``StanfordCarsDataModule``: the
"side-on" transforms). The augmented views are made from the batch itself, so predictions stay in the order of the
labels, and the draws come from a generator reseeded at the start of every validation or test epoch, so TTA results
repeat.

``tta_mode="mirror_translate"`` is airbench's fixed TTA instead (K. Jordan, arXiv:2404.00498, "multi-crop
evaluation"): six views, the image and its mirror (weight 1/4 each) and the image translated by one pixel up-left
and down-right with reflection padding, each with its mirror (1/8 each), their logits averaged with those weights.

A network may adapt to the data and the epoch (``models.airbench.AirbenchNet`` does): if it has
``init_from_data(images)``, ``data_initialized`` and ``init_images``, ``on_fit_start`` calls ``init_from_data`` with
the datamodule's ``train_images(init_images)`` unless ``data_initialized`` (fitted before, or restored from a
checkpoint); if it has ``set_epoch(epoch)``, it is called at the start of every training epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from datamodules.contract import AugmentedEvaluation, TrainImages, require
from lightning_adamw import OptimizerConfig

#: Seed of the TTA draws (plus the global rank), set at the start of every validation and test epoch.
TTA_SEED = 0
#: RECIPES.md "Models": augmented passes besides the clean one.
TTA_PASSES = 4
TtaMode = Literal["augment", "mirror_translate"]


def mirror_translate_logits(net: Callable[[Tensor], Tensor], images: Tensor, logits: Tensor) -> Tensor:
    """airbench's six-view TTA: weighted mean logits of the image, its mirror and two 1-pixel translations.

    ``logits`` is ``net(images)`` (the clean pass, already computed). Weights: image and mirror 1/4 each; the
    translations up-left and down-right (reflection-padded by one pixel) and their mirrors 1/8 each.
    """
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = (padded[..., :h, :w], padded[..., 2:, 2:])
    total = 0.25 * (logits.float() + net(images.flip(-1)).float())
    for view in shifted:
        total = total + 0.125 * (net(view).float() + net(view.flip(-1)).float())
    return total


class ImageClassifier(LightningModule):
    """Image classification with a network from the zoo.

    The network exposes ``num_classes`` (its number of outputs) and ``layer_groups()`` (body groups first, head
    last; ``FreezeUnfreeze`` uses them and the optimizer is built over all of them), as ``WideResNet`` and
    ``CarsResNet50`` do.

    Logs ``train/loss`` (with label smoothing), ``val/loss`` and ``test/loss`` (plain cross-entropy of the clean
    pass), ``val/acc``, ``test/acc``, and with TTA ``val/acc_tta`` and ``test/acc_tta``.

    Args:
        net: the network, e.g. ``WideResNet`` or ``CarsResNet50`` (``class_path`` in a config).
        optimizer: registry name and hyperparameters; ``None``: Adam, lr 1e-3, no weight decay.
        label_smoothing: label smoothing of the training loss (0: none, as in the 2018 study).
        tta: evaluate with test-time augmentation on validation and test.
        tta_mode: ``"augment"``: the clean pass plus ``tta_passes`` passes with the datamodule's training
            augmentation (``tta_augment``), probabilities averaged (the study); ``"mirror_translate"``: airbench's six
            fixed views (see the module docstring).
        tta_passes: augmented passes besides the clean one, for ``tta_mode="augment"`` (``None``: 4, RECIPES.md).
        channels_last: keep the network's weights and its inputs in channels-last memory format (faster convolutions
            on CPUs with oneDNN and on tensor-core GPUs).
        tta_last_epochs: with ``tta``, the validations during ``fit`` compute TTA only in the last this many training
            epochs (``None``: at every validation). TTA costs several forward passes, while a 1cycle run reaches its
            accuracy at the end: per-epoch curves stay cheap and the final epochs still log ``val/acc_tta``.
            ``trainer.validate`` and ``test`` always use TTA.

    A checkpoint holds the network's weights but not its constructor arguments: resume through the CLI with the same
    config, or ``ImageClassifier.load_from_checkpoint(path, net=WideResNet(...))``. The TTA switch is not saved with
    it: ``test --config X.yaml --model.init_args.tta true --ckpt_path last.ckpt`` tests a run with TTA.

    Example::

        model = ImageClassifier(WideResNet(), OptimizerConfig("adamw", lr=3e-3, betas=(0.95, 0.99), weight_decay=0.1))
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerConfig | None = None,
        label_smoothing: float = 0.0,
        tta: bool = False,
        tta_passes: int | None = None,
        tta_mode: TtaMode = "augment",
        channels_last: bool = False,
        tta_last_epochs: int | None = None,
    ) -> None:
        super().__init__()
        num_classes = getattr(net, "num_classes", None)
        if not isinstance(num_classes, int) or not callable(getattr(net, "layer_groups", None)):
            raise TypeError(
                f"ImageClassifier needs a network with `num_classes` (int) and `layer_groups()` (body first, head "
                f"last), as models.wrn.WideResNet and models.resnet_cars.CarsResNet50 have; {type(net).__name__} lacks "
                "them. Add both to your network class."
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}.")
        if tta_mode not in ("augment", "mirror_translate"):
            raise ValueError(f"tta_mode must be 'augment' or 'mirror_translate', got {tta_mode!r}.")
        if tta_mode == "mirror_translate" and tta_passes is not None:
            raise ValueError(
                f"tta_passes={tta_passes} has no effect with tta_mode='mirror_translate' (six fixed views); drop it."
            )
        if tta_last_epochs is not None and (not tta or tta_last_epochs < 1):
            raise ValueError(
                f"tta_last_epochs={tta_last_epochs} " + ("must be >= 1 (or null: TTA at every validation)."
                                                         if tta else "has no effect without tta=true; drop it.")
            )
        tta_passes = TTA_PASSES if tta_passes is None else tta_passes
        if tta_passes < 1:
            raise ValueError(f"tta_passes must be >= 1 (augmented passes besides the clean one), got {tta_passes}.")
        # the network is saved in the state dict; TTA is chosen when evaluating, so that a checkpoint trained without
        # it can be tested with it (LightningCLI lets a checkpoint's hyperparameters override the command line)
        self.save_hyperparameters(ignore=["net", "tta", "tta_passes", "tta_mode", "tta_last_epochs"])
        self.net = net
        self.optimizer_config = optimizer if optimizer is not None else OptimizerConfig("adam", lr=1e-3)
        self.label_smoothing = label_smoothing
        self.tta = tta
        self.tta_passes = tta_passes
        self.tta_mode = tta_mode
        self.tta_last_epochs = tta_last_epochs
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.metrics = nn.ModuleDict({
            f"{stage}_{name}": MulticlassAccuracy(num_classes, average="micro")
            for stage in ("val", "test") for name in ("acc", "acc_tta")
        })
        # a torchmetrics mean weighted by batch size: under DDP with shards of unequal length (every image counted
        # once) it stays exact, where self.log(sync_dist=True) divides by the wrong count
        self.metrics.update({f"{stage}_loss": MeanMetric() for stage in ("val", "test")})
        # seeded at the start of every validation and test epoch (a torch.Generator cannot be pickled into ddp_spawn's
        # worker processes, so none exists before)
        self._tta_generator: torch.Generator | None = None

    def forward(self, images: Tensor) -> Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def layer_groups(self) -> list[nn.Module]:
        """The network's layer groups, body first and head last."""
        return list(self.net.layer_groups())

    def configure_optimizers(self) -> Optimizer:
        # only the optimizer: the schedule and decoupled weight decay are the OneCycleWD callback's
        return self.optimizer_config.build(self.layer_groups())

    def setup(self, stage: str) -> None:
        if self.tta and self.tta_mode == "augment" and stage in ("fit", "validate", "test"):
            self._tta_augment()

    def on_fit_start(self) -> None:
        init = getattr(self.net, "init_from_data", None)
        if not callable(init) or self.net.data_initialized:
            return
        data = require(self.trainer.datamodule, TrainImages,
                       f"{type(self.net).__name__}, fitted to the training images,",
                       "or start from a checkpoint of a fitted network")
        init(data.train_images(self.net.init_images).to(self.device))

    def on_train_epoch_start(self) -> None:
        set_epoch = getattr(self.net, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.current_epoch)

    def _tta_augment(self) -> Callable[[Tensor, torch.Generator], Tensor]:
        data = require(self.trainer.datamodule, AugmentedEvaluation, "ImageClassifier(tta=True, tta_mode='augment')",
                       "pass the datamodule rather than bare dataloaders, or set model.init_args.tta=false")
        return data.tta_augment

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def tta_probabilities(self, images: Tensor, logits: Tensor) -> Tensor:
        """Mean softmax of the clean pass (``logits``) and ``tta_passes`` passes over augmented ``images``; with
        ``tta_mode="mirror_translate"``, the softmax of airbench's weighted six-view logits."""
        if self.tta_mode == "mirror_translate":
            return mirror_translate_logits(self, images, logits).softmax(dim=-1)
        augment = self._tta_augment()
        if self._tta_generator is None:
            self._seed_tta()
        probs = logits.float().softmax(dim=-1)
        for _ in range(self.tta_passes):
            probs = probs + self(augment(images, self._tta_generator)).float().softmax(dim=-1)
        return probs / (self.tta_passes + 1)

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        loss = self.metrics[f"{stage}_loss"]
        loss.update(F.cross_entropy(logits.float(), labels), weight=len(labels))
        self.log(f"{stage}/loss", loss, on_epoch=True)
        accuracy = self.metrics[f"{stage}_acc"]
        accuracy.update(logits, labels)
        self.log(f"{stage}/acc", accuracy, on_epoch=True, prog_bar=True)
        if self._tta_now(stage):
            accuracy_tta = self.metrics[f"{stage}_acc_tta"]
            accuracy_tta.update(self.tta_probabilities(images, logits), labels)
            self.log(f"{stage}/acc_tta", accuracy_tta, on_epoch=True, prog_bar=True)

    def _tta_now(self, stage: str) -> bool:
        """Whether this evaluation computes TTA: always with ``tta``, except in ``fit``'s validations before the
        last ``tta_last_epochs`` epochs of the run (counted in optimizer steps, so ``max_steps`` counts too). The
        sanity check, which runs before the training data's length is known, computes it (it checks the code)."""
        trainer = self.trainer
        if not self.tta or self.tta_last_epochs is None or stage != "val" or trainer.state.fn != "fit" \
                or trainer.sanity_checking:
            return self.tta
        total, batches = trainer.estimated_stepping_batches, trainer.num_training_batches
        if not (math.isfinite(total) and math.isfinite(batches)):
            return True  # no end in sight: every validation might be the last
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        return self.global_step > total - self.tta_last_epochs * per_epoch

    def _seed_tta(self) -> None:
        self._tta_generator = torch.Generator().manual_seed(TTA_SEED + self.global_rank)

    def on_validation_epoch_start(self) -> None:
        self._seed_tta()

    def on_test_epoch_start(self) -> None:
        self._seed_tta()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")
