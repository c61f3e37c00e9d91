"""CIFAR-10 in torchvision's on-disk format, with the 2018 study's augmentation and a fast data path.

Two loaders produce the same training distribution (pad 4 by reflection, random 32x32 crop, horizontal flip, then
the CIFAR-10 normalisation of RECIPES.md). The padding repeats the edge pixel by default, as the study's loader did
(fastai 0.7 pads with OpenCV's ``BORDER_REFLECT``, numpy's "symmetric"); ``padding_mode="reflect"`` gives torch's
reflection, which does not repeat it. The last, incomplete training batch is kept, as the study's loader kept it
(391 steps per epoch at batch 128); ``drop_last=True`` drops it.

For the airbench recipe (``configs/cifar10_fast.yaml``): ``pad=2`` with ``padding_mode="reflect"`` gives its
translate-by-2 crops, and ``flip="alternating"`` its derandomised flip (K. Jordan, arXiv:2404.00498): each training
image is flipped at random in the first epoch and the opposite way from the previous epoch after that, so every
image is seen both ways in every pair of epochs. The flips are a function of the seed, the image and the epoch.

* ``loader="device"`` (default): each split is one uint8 tensor moved once to the training device; batches are
  slices of it and are normalised and augmented there, a whole batch at a time, in ``on_after_batch_transfer``
  (how the speed-record CIFAR-10 trainers, e.g. airbench, keep the GPU fed).
* ``loader="torchvision"``: the standard ``DataLoader`` with per-image PIL transforms in worker processes.

Validation is the test set, as in the study, unless ``val_size`` holds images out of the training set.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from datamodules.contract import rank_world

#: RECIPES.md, "Models": CIFAR-10 channel mean and standard deviation.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: RECIPES.md: pad 4, then a random 32x32 crop.
PAD = 4
PaddingMode = Literal["symmetric", "reflect"]
FlipMode = Literal["random", "alternating"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta")


def reflect(index: Tensor, size: int, mode: PaddingMode = "symmetric") -> Tensor:
    """Map indices in ``[-size, 2 * size - 1]`` into ``[0, size)`` as padding by reflection does.

    ``"symmetric"`` repeats the edge pixel (``-1 -> 0``, OpenCV ``BORDER_REFLECT``, the study's loader);
    ``"reflect"`` does not (``-1 -> 1``, torch and torchvision ``"reflect"``).
    """
    if mode == "symmetric":
        index = torch.where(index < 0, -1 - index, index)
        return torch.where(index >= size, 2 * size - 1 - index, index)
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def crop_flip(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, pad: int = PAD,
              mode: PaddingMode = "symmetric") -> Tensor:
    """Crop every image of a padded batch at its own offset and mirror the width axis where ``flip``.

    Args:
        images: ``(N, C, H, W)`` batch of any dtype (uint8 before normalisation, or float).
        top, left: ``(N,)`` integer offsets in ``[0, 2 * pad]`` into the padded images (``pad, pad`` is the centre).
        flip: ``(N,)`` booleans; ``True`` reverses the last (width) axis of that image.
        pad: padding on each side (``pad < H, W``).
        mode: how the padding reflects the image (see :func:`reflect`).

    Returns the ``(N, C, H, W)`` crops. The padding is never materialised: each output pixel's source index is
    computed (reflected at the borders, reversed where flipped) and read with one ``gather``.
    """
    n, c, h, w = images.shape
    rows = reflect(top.view(n, 1) - pad + torch.arange(h, device=images.device), h, mode)
    cols = reflect(left.view(n, 1) - pad + torch.arange(w, device=images.device), w, mode)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    index = (rows.view(n, h, 1) * w + cols.view(n, 1, w)).view(n, 1, h * w).expand(n, c, h * w)
    return images.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)


def random_crop_flip(images: Tensor, generator: torch.Generator, pad: int = PAD,
                     mode: PaddingMode = "symmetric") -> Tensor:
    """The training augmentation on a batch: a uniform offset in ``[0, 2 * pad]^2`` and a fair flip per image.

    The random draws come from ``generator`` (a CPU generator) so results repeat whatever the device.
    """
    n = images.shape[0]
    top, left = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(images.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    return crop_flip(images, top, left, flip, pad, mode)


def normalize(images: Tensor) -> Tensor:
    """uint8 ``(N, 3, H, W)`` images to float32 ``(x / 255 - mean) / std`` with the CIFAR-10 mean and std."""
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    shift = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1) / std
    return images.float().mul_(1.0 / (255.0 * std)).sub_(shift)


def train_transform(mode: PaddingMode = "symmetric", pad: int = PAD) -> v2.Compose:
    """The per-image PIL training transform of the torchvision path (the same augmentation as ``random_crop_flip``)."""
    return v2.Compose([
        v2.RandomCrop(32, padding=pad, padding_mode=mode),
        v2.RandomHorizontalFlip(),
        *eval_transform().transforms,
    ])


def eval_transform() -> v2.Compose:
    """PIL image to a normalised float tensor."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


class DeviceBatches:
    """Batches sliced out of tensors that already live on the training device: the fast path's loader.

    The order comes from ``sampler`` (a ``DistributedSampler`` over the indices: this rank's shard, reshuffled each
    epoch from its seed; Lightning calls ``sampler.set_epoch`` at every epoch, as for a ``DataLoader``, and reads
    ``batch_sampler`` beside it, hence that attribute).

    The loader resumes mid-epoch exactly: its ``state_dict`` (which Lightning saves in the checkpoint's loop state)
    holds the epoch, the number of batches served in it and the state of the augmentation ``generator``; after
    ``load_state_dict`` the next pass over that epoch skips the served batches, and the augmentation continues with
    the draws the uninterrupted run would have made.

    Args:
        images: ``(N, 3, 32, 32)`` uint8 images.
        labels: ``(N,)`` int64 labels on the same device.
        batch_size: images per batch.
        sampler: yields the indices of one epoch.
        drop_last: drop the last, incomplete batch.
        flip_bits: ``(N,)`` booleans for alternating flips: image ``i`` comes mirrored (width axis) in epoch ``e``
            when ``flip_bits[i] != (e % 2 == 1)``, ``e`` being the sampler's ``epoch``; ``None``: no flips here.
        generator: the generator of the training augmentation's draws, saved and restored with the position.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, sampler: DistributedSampler | range,
                 drop_last: bool, flip_bits: Tensor | None = None, generator: torch.Generator | None = None) -> None:
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.sampler = sampler
        self.batch_sampler = None
        self.drop_last = drop_last
        self.flip_bits = flip_bits
        self.generator = generator
        self._epoch = 0
        self._served = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches served) from a checkpoint

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Any:
        self._epoch = getattr(self.sampler, "epoch", 0)
        resume, self._resume = self._resume, None
        self._served = resume[1] if resume is not None and resume[0] == self._epoch else 0
        order = torch.tensor(list(self.sampler), dtype=torch.long, device=self.images.device)
        odd_epoch = self._epoch % 2 == 1
        for i in range(self._served, len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            images = self.images[index]
            if self.flip_bits is not None:
                flip = (self.flip_bits[index] != odd_epoch).view(-1, 1, 1, 1)
                images = torch.where(flip, images.flip(3), images)
            self._served = i + 1  # counted when handed out: Lightning fetches a sized loader's batches one by one
            yield images, self.labels[index]

    def _rank(self) -> int:
        return getattr(self.sampler, "rank", 0)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self._epoch, "served": self._served, "rank": self._rank()}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = (int(state["epoch"]), int(state["served"]))
        if self.generator is None or "generator" not in state:
            return
        if int(state.get("rank", 0)) == self._rank():
            self.generator.set_state(state["generator"])
            return
        # a checkpoint holds rank 0's loader state only: the other ranks draw from a seed of their own and position
        self.generator.manual_seed(self.generator.initial_seed() + 1_000_003 * (1 + self._resume[0]) + self._resume[1])
        warnings.warn(f"DeviceBatches on rank {self._rank()}: the checkpoint holds rank {state.get('rank', 0)}'s "
                      "augmentation state; this rank resumes with fresh augmentation draws (the data order is exact).",
                      stacklevel=2)


class PILImages(Dataset):
    """uint8 ``(N, 3, H, W)`` images as PIL images through ``transform``: what ``torchvision.datasets.CIFAR10`` does."""

    def __init__(self, images: Tensor, labels: Tensor, transform: v2.Compose) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


class CIFAR10DataModule(LightningDataModule):
    """CIFAR-10 for the 2018 study's WRN-22 recipe (RECIPES.md, CIFAR-10 rows).

    Args:
        data_dir: the folder holding (or to receive) ``cifar-10-batches-py/``, torchvision's format.
        download: download the archive into ``data_dir`` when it is absent (needs internet).
        batch_size: images per batch and per device (recipe: 128).
        loader: ``"device"``: each split held as one uint8 tensor on the training device and augmented there in
            batches; ``"torchvision"``: a ``DataLoader`` with per-image PIL transforms (see the module docstring).
        val_size: ``0`` validates on the 10,000 test images, as the study did; ``n > 0`` holds ``n`` random training
            images out for validation instead.
        train_subset: train on this many random training images (quick CPU runs); ``None``: all of them.
        eval_subset: validate and test on the first this-many images of those splits; ``None``: all of them.
        num_workers: worker processes of the torchvision loader (the device loader needs none).
        seed: seed of the held-out split, the subset, the shuffling and the device path's augmentation.
        padding_mode: ``"symmetric"`` (the edge pixel repeated, as the study's fastai 0.7 loader) or ``"reflect"``
            (torch's reflection) for the crops' padding.
        drop_last: drop the last, incomplete training batch (the study kept it: 391 steps per epoch at batch 128).
        pad: padding on each side before the random 32x32 crop (the study: 4; airbench's translate-by-2: 2).
        flip: ``"random"``: a fair flip per image and epoch (the study); ``"alternating"``: airbench's alternating
            flip (see the module docstring; device loader only).

    Example::

        python -m lightning_adamw fit --config configs/cifar10.yaml --data.init_args.data_dir /datasets/cifar10
    """

    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    num_classes = 10

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        download: bool = True,
        batch_size: int = 128,
        loader: Literal["device", "torchvision"] = "device",
        val_size: int = 0,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        num_workers: int = 2,
        seed: int = 0,
        padding_mode: PaddingMode = "symmetric",
        drop_last: bool = False,
        pad: int = PAD,
        flip: FlipMode = "random",
    ) -> None:
        super().__init__()
        if loader not in ("device", "torchvision"):
            raise ValueError(f"loader must be 'device' or 'torchvision', got {loader!r}.")
        if padding_mode not in ("symmetric", "reflect"):
            raise ValueError(f"padding_mode must be 'symmetric' or 'reflect', got {padding_mode!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0 <= pad < 32:
            raise ValueError(f"pad must lie in [0, 32) pixels (0: no crops), got {pad}.")
        if flip not in ("random", "alternating"):
            raise ValueError(f"flip must be 'random' or 'alternating', got {flip!r}.")
        if flip == "alternating" and loader != "device":
            raise ValueError(
                "flip='alternating' needs loader='device' (the flips follow each image's index, which the "
                "torchvision loader's per-image transforms do not see); use loader='device' or flip='random'."
            )
        if not 0 <= val_size < 50_000:
            raise ValueError(f"val_size must lie in [0, 50000) (0 validates on the test set), got {val_size}.")
        for name, value in (("train_subset", train_subset), ("eval_subset", eval_subset)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of images or None (all), got {value}.")
        if train_subset is not None and train_subset > 50_000 - val_size:
            raise ValueError(
                f"train_subset={train_subset} exceeds the {50_000 - val_size} training images left after "
                f"val_size={val_size}; lower it or set it to None."
            )
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.download = download
        self.batch_size = batch_size
        self.loader = loader
        self.val_size = val_size
        self.train_subset = train_subset
        self.eval_subset = eval_subset
        self.num_workers = num_workers
        self.seed = seed
        self.padding_mode = padding_mode
        self.drop_last = drop_last
        self.pad = pad
        self.flip = flip
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        # made when training starts: a torch.Generator cannot be pickled into ddp_spawn's worker processes
        self._augment_generator: torch.Generator | None = None

    # ------------------------------------------------------------------ data on disk
    @property
    def folder(self) -> Path:
        """``data_dir/cifar-10-batches-py``."""
        return self.data_dir / "cifar-10-batches-py"

    def _missing_message(self, reason: str) -> str:
        return (
            f"CIFAR-10 {reason} in {self.folder} (expected torchvision's format: "
            f"{', '.join(CIFAR10_FILES)}). Run once with internet and data.init_args.download=true, or download "
            f"{CIFAR10_URL} and extract it into {self.data_dir} (it unpacks to cifar-10-batches-py/), or set "
            "data.init_args.data_dir to the folder that holds cifar-10-batches-py/."
        )

    def _bad_files_message(self) -> str:
        """Which of torchvision's files are missing or fail their md5 check, by name."""
        checksums = [*CIFAR10.train_list, *CIFAR10.test_list, [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
        missing = [name for name, _ in checksums if not (self.folder / name).is_file()]
        if len(missing) == len(checksums):
            return self._missing_message("was not found")
        corrupt = [str(self.folder / name) for name, md5 in checksums
                   if name not in missing and not check_integrity(str(self.folder / name), md5)]
        problems = ([f"{', '.join(corrupt)} {'fails' if len(corrupt) == 1 else 'fail'} the md5 check of the "
                     "official release (truncated or corrupted)"] if corrupt else [])
        problems += [f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"] if missing else []
        return (
            f"CIFAR-10 in {self.folder}: {'; '.join(problems)}. Delete the bad files and run with "
            f"data.init_args.download=true, or extract them again from {CIFAR10_URL}."
        )

    def prepare_data(self) -> None:
        """Download the archive into ``data_dir`` when files are missing and ``download`` is on (rank 0 only)."""
        if not self.download or all((self.folder / name).is_file() for name in CIFAR10_FILES):
            return
        try:
            CIFAR10(str(self.data_dir), train=True, download=True)
        except OSError as err:
            raise RuntimeError(self._missing_message(f"is missing and could not be downloaded ({err})")) from err

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            dataset = CIFAR10(str(self.data_dir), train=train, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted." (for any of the seven files)
            raise RuntimeError(self._bad_files_message()) from err
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(dataset.targets, dtype=torch.long)

    def _split_train(self, images: Tensor, labels: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        # the held-out images and the training subset come from one seeded permutation
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        held_out, train = order[:self.val_size], order[self.val_size:]
        if self.train_subset is not None:
            train = train[:self.train_subset]
        return (images[train], labels[train]), (images[held_out], labels[held_out])

    def setup(self, stage: str) -> None:
        """Read the splits this stage needs as uint8 tensors (``fit``: train and validation)."""
        if stage == "fit" and "train" not in self.splits:
            self.splits["train"], held_out = self._split_train(*self._read(train=True))
            if self.val_size:
                self.splits["val"] = self._first(*held_out)
        if stage in ("fit", "validate") and "val" not in self.splits:
            val = self._split_train(*self._read(train=True))[1] if self.val_size else self._read(train=False)
            self.splits["val"] = self._first(*val)
        if stage == "test" and "test" not in self.splits:
            self.splits["test"] = self._first(*self._read(train=False))

    def _first(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        n = len(labels) if self.eval_subset is None else self.eval_subset
        return images[:n], labels[:n]

    def train_images(self, n: int | None = None) -> Tensor:
        """The first ``n`` training images (all with ``None``), unaugmented and normalised, on the CPU.

        For networks initialised from data (the whitening of ``models.airbench.AirbenchNet``); call ``setup("fit")``
        first.
        """
        if "train" not in self.splits:
            raise RuntimeError("CIFAR10DataModule.train_images: call setup('fit') before reading the training images.")
        return normalize(self.splits["train"][0][:n])

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, train: bool) -> DeviceBatches | DataLoader:
        if split not in self.splits:
            raise RuntimeError(f"CIFAR10DataModule: call setup() for the {split!r} split before its dataloader.")
        images, labels = self.splits[split]
        if self.loader == "torchvision":
            dataset = PILImages(images, labels,
                                train_transform(self.padding_mode, self.pad) if train else eval_transform())
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=train, drop_last=train and self.drop_last,
                              num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                              pin_memory=torch.cuda.is_available())
        rank, world_size = rank_world(self.trainer)
        if train:  # each rank draws its own crops and flips
            self._augment_generator = torch.Generator().manual_seed(self.seed + rank)
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        # training: DistributedSampler (given rank and world size, it needs no process group) shuffles per epoch;
        # evaluation: every world_size-th image, unpadded, so that each image is counted exactly once across ranks
        sampler = (DistributedSampler(range(len(labels)), num_replicas=world_size, rank=rank, shuffle=True,
                                      seed=self.seed, drop_last=True)
                   if train else range(rank, len(labels), world_size))
        # alternating flips: one fair coin per training image from the seed, the same on every rank
        flip_bits = (torch.rand(len(labels), generator=torch.Generator().manual_seed(self.seed)) < 0.5
                     if train and self.flip == "alternating" else None)
        return DeviceBatches(images.to(device), labels.to(device), self.batch_size, sampler,
                             drop_last=train and self.drop_last,
                             flip_bits=None if flip_bits is None else flip_bits.to(device),
                             generator=self._augment_generator if train else None)

    def train_dataloader(self) -> DeviceBatches | DataLoader:
        loader = self._loader("train", train=True)
        n = len(self.splits["train"][1])
        world_size = rank_world(self.trainer)[1]
        # the device loader's sampler drops the remainder across devices; Lightning's DistributedSampler pads it
        per_device = n // world_size if self.loader == "device" else math.ceil(n / world_size)
        if per_device == 0 or (self.drop_last and per_device < self.batch_size):
            subset = f"train_subset={self.train_subset}" if self.train_subset is not None else "the training split"
            raise ValueError(
                f"CIFAR-10: {subset} gives {per_device} training images per device (of {world_size}), fewer than "
                f"one batch of batch_size={self.batch_size}{' with drop_last=true' * self.drop_last}: no training "
                "step. Raise train_subset, lower batch_size or set drop_last=false."
            )
        return loader

    def val_dataloader(self) -> DeviceBatches | DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DeviceBatches | DataLoader:
        return self._loader("test", train=False)

    # ------------------------------------------------------------------ on the device
    def batch_transform(self, images: Tensor, train: bool) -> Tensor:
        """The device path's per-batch work: crop and flip for training (on the uint8 pixels), then normalise.

        The crops and flips come from the generator seeded by ``train_dataloader`` (``seed + rank``), or seeded with
        ``seed`` on first use when no training loader was made.
        """
        if not train:
            return normalize(images)
        if self._augment_generator is None:
            self._augment_generator = torch.Generator().manual_seed(self.seed)
        if self.flip == "alternating":  # flipped already by DeviceBatches: crops only
            n = images.shape[0]
            top, left = torch.randint(0, 2 * self.pad + 1, (2, n), generator=self._augment_generator).to(images.device)
            no_flip = torch.zeros(n, dtype=torch.bool, device=images.device)
            return normalize(crop_flip(images, top, left, no_flip, self.pad, self.padding_mode))
        return normalize(random_crop_flip(images, self._augment_generator, self.pad, self.padding_mode))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.loader != "device":
            return batch
        images, labels = batch
        return self.batch_transform(images, train=self.trainer.training), labels

    def tta_augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The training augmentation on a normalised evaluation batch (test-time augmentation, ImageClassifier).

        Padding, cropping and flipping commute with the per-channel normalisation, so this is the same transform the
        training images get.
        """
        return random_crop_flip(images, generator, self.pad, self.padding_mode)
