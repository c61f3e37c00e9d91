"""Stanford Cars (196 classes) for the 2018 study's ResNet-50 fine-tuning recipe.

Two layouts on disk (``layout="auto"`` finds which):

* ``devkit``: the original release, what ``torchvision.datasets.StanfordCars`` reads: ``devkit/cars_meta.mat``
  (class names), ``devkit/cars_train_annos.mat`` with ``cars_train/*.jpg``, and ``cars_test_annos_withlabels.mat``
  with ``cars_test/*.jpg``. ``data_dir`` may also be torchvision's root, the folder above ``stanford_cars/``.
* ``folders``: ``train/<class name>/*.jpg`` and ``test/<class name>/*.jpg``, one folder per class named as in
  ``cars_meta.mat`` (``/`` written ``-``: ``Ram C-V Cargo Van Minivan 2012``). Labels follow ``cars_meta.mat``'s order
  (:data:`CLASS_NAMES`), whichever folders are present, so both layouts give the same labels.

As in the study (RECIPES.md), training uses the 8,144 train images and validation (and test) the 8,041 test images;
the bounding boxes are not used. Before training, ``setup`` lists every image that is missing, in an empty or
missing class folder, or unreadable, by file name; ``skip_bad=True`` drops them with a warning instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import scipy.io
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from datamodules.contract import rank_world

#: ImageNet statistics: the normalisation the pretrained ResNet-50 expects (RECIPES.md, Cars augmentation).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: fastai 2018 "side-on" transforms (RECIPES.md): rotation up to 10 degrees, lighting 0.05, zoom up to 1.05.
MAX_ROTATION = 10.0
LIGHTING = 0.05
MAX_ZOOM = 1.05
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: How many file names an error lists per kind of problem.
SHOWN = 5

WHERE_TO_GET = (
    "torchvision cannot download Stanford Cars any more (its source went offline, pytorch/vision#7545); copies "
    "exist, e.g. the Kaggle dataset jessicali9530/stanford-cars-dataset (images and devkit; the labelled "
    "cars_test_annos_withlabels.mat is linked from that torchvision issue)."
)

Sample = tuple[Path, int]
#: The 196 class names of the official ``devkit/cars_meta.mat``, in its order (label ``i`` is line ``i + 1``).
CLASS_NAMES = tuple(Path(__file__).with_name("cars_classes.txt").read_text(encoding="utf-8").splitlines())


def folder_name(class_name: str) -> str:
    """The class folder of ``class_name`` in the ``folders`` layout (a file name cannot hold ``/``)."""
    return class_name.replace("/", "-")


def load_mat(path: Path, key: str) -> object:
    """``key`` of the MATLAB file ``path``; a file that does not load or lacks ``key`` is named in the error."""
    try:
        return scipy.io.loadmat(path, squeeze_me=True)[key]
    except Exception as err:  # scipy raises ValueError, MatReadError, OSError, ... on broken files
        reason = (f"has no {key!r} entry" if isinstance(err, KeyError)
                  else f"cannot be read ({type(err).__name__}: {err})")
        raise ValueError(
            f"Stanford Cars annotation file {path} {reason}: replace it with the official file. {WHERE_TO_GET}"
        ) from err


def train_augmentation(size: int) -> v2.Compose:
    """fastai 2018's side-on training augmentation with torchvision v2 (PIL images or ``(C, H, W)`` float tensors).

    Zoom: the shorter side is resized to a random value in ``[size, 1.05 size]``; then rotation up to 10 degrees,
    brightness and contrast jitter 0.05, horizontal flip, and a random ``size`` crop.
    """
    return v2.Compose([
        v2.RandomResize(size, math.floor(size * MAX_ZOOM) + 1),  # shorter side: a random int in [size, 1.05 size]
        v2.RandomRotation(MAX_ROTATION),
        v2.ColorJitter(brightness=LIGHTING, contrast=LIGHTING),
        v2.RandomHorizontalFlip(),
        v2.RandomCrop(size),
    ])


def to_normalized_tensor() -> list[v2.Transform]:
    """PIL image to a float tensor with the ImageNet normalisation."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(size: int) -> v2.Compose:
    """The per-image training transform: augmentation, then normalisation."""
    return v2.Compose([train_augmentation(size), *to_normalized_tensor()])


def eval_transform(size: int) -> v2.Compose:
    """Evaluation: resize the shorter side to ``size`` and centre-crop ``size`` (RECIPES.md)."""
    return v2.Compose([v2.Resize(size), v2.CenterCrop(size), *to_normalized_tensor()])


def open_rgb(path: Path, min_side: int) -> Image.Image:
    """Decode ``path`` as RGB; a JPEG directly at a reduced scale whose shorter side stays >= ``min_side``."""
    with Image.open(path) as image:
        image.draft("RGB", (min_side, min_side))  # libjpeg's DCT scaling: several times faster than a full decode
        return image.convert("RGB")


def unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be decoded as an image, or ``None`` when it can (decoded at 1/8 scale where possible)."""
    try:
        open_rgb(path, 1)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
        return f"{type(err).__name__}: {err}"
    return None


class ImageFiles(Dataset):
    """``(path, label)`` samples decoded with PIL and transformed; a file that fails is named in the error."""

    def __init__(self, samples: list[Sample], transform: Callable[[Image.Image], Tensor], min_side: int) -> None:
        self.samples = samples
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        try:
            image = open_rgb(path, self.min_side)
        except Exception as err:
            raise RuntimeError(f"Could not read image {path}: {err}. Remove or replace the file.") from err
        return self.transform(image), label


class StanfordCarsDataModule(LightningDataModule):
    """Stanford Cars in the devkit or the class-folder layout (see the module docstring).

    Args:
        data_dir: the dataset folder (``devkit/``, ``cars_train/``, ... or ``train/``, ``test/``).
        layout: ``"auto"``, ``"devkit"`` or ``"folders"``.
        image_size: training crop and evaluation size (recipe: 224).
        batch_size: images per batch and per device (recipe: 128).
        num_workers: loader worker processes, also the threads that check the images in ``setup``.
        skip_bad: drop missing and unreadable images (with a warning giving counts) instead of stopping.
        check_images: decode every image once in ``setup`` to find unreadable files before training. Without the
            check, an unreadable image stops training when a worker reaches it (the error names the file).
        drop_last: drop the last, incomplete training batch (the study's loader kept it: 64 steps per epoch at
            batch 128).
        download: Stanford Cars cannot be downloaded any more; ``true`` stops with where to get it.

    Example::

        python -m lightning_adamw fit --config configs/cars.yaml --data.init_args.data_dir /datasets/stanford_cars
    """

    def __init__(
        self,
        data_dir: str = "data/stanford_cars",
        layout: Literal["auto", "devkit", "folders"] = "auto",
        image_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 4,
        skip_bad: bool = False,
        check_images: bool = True,
        drop_last: bool = False,
        download: bool = False,
    ) -> None:
        super().__init__()
        if download:
            raise ValueError(
                f"Stanford Cars cannot be downloaded automatically (data.init_args.download=true): {WHERE_TO_GET} "
                "Unpack it and set data.init_args.data_dir to that folder (devkit or class-folder layout)."
            )
        if layout not in ("auto", "devkit", "folders"):
            raise ValueError(f"layout must be 'auto', 'devkit' or 'folders', got {layout!r}.")
        if image_size < 8 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"Need image_size >= 8, batch_size >= 1 and num_workers >= 0, got {image_size}, {batch_size}, "
                f"{num_workers}."
            )
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.layout = layout
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.skip_bad = skip_bad
        self.check_images = check_images
        self.drop_last = drop_last
        self.classes: list[str] = []
        self.samples: dict[str, list[Sample]] = {}
        self._augment = train_augmentation(image_size)
        # decode JPEGs at a reduced scale that still covers the largest zoom
        self._min_side = math.ceil(image_size * MAX_ZOOM)

    @property
    def num_classes(self) -> int:
        """Number of classes (196 for the full dataset); known after ``setup``."""
        return len(self.classes)

    # ------------------------------------------------------------------ finding the files
    def _resolve_layout(self) -> tuple[str, Path]:
        root = self.data_dir
        candidates = {"devkit": [root, root / "stanford_cars"], "folders": [root]}
        marker = {"devkit": "devkit", "folders": "train"}
        kinds = ("devkit", "folders") if self.layout == "auto" else (self.layout,)
        for kind in kinds:
            for folder in candidates[kind]:
                if (folder / marker[kind]).is_dir():
                    return kind, folder
        raise FileNotFoundError(
            f"Stanford Cars not found in {root} (layout={self.layout!r}). Expected the original devkit layout, "
            f"which torchvision.datasets.StanfordCars reads: {root}/devkit/cars_meta.mat, "
            f"{root}/devkit/cars_train_annos.mat, {root}/cars_train/*.jpg, {root}/cars_test_annos_withlabels.mat, "
            f"{root}/cars_test/*.jpg; or class folders: {root}/train/<class name>/*.jpg and "
            f"{root}/test/<class name>/*.jpg. {WHERE_TO_GET} Then set data.init_args.data_dir to that folder."
        )

    def _devkit(self, root: Path, splits: list[str], problems: dict[str, list[str]]) -> dict[str, list[Sample]]:
        files = {
            "meta": root / "devkit" / "cars_meta.mat",
            "train": root / "devkit" / "cars_train_annos.mat",
            "test": root / "cars_test_annos_withlabels.mat",
        }
        absent = [str(files[k]) for k in ("meta", *splits) if not files[k].is_file()]
        if absent:
            raise FileNotFoundError(
                f"Stanford Cars devkit layout in {root} lacks {', '.join(absent)}. {WHERE_TO_GET}"
            )
        self.classes = [str(name) for name in load_mat(files["meta"], "class_names")]
        out = {}
        for split in splits:
            image_dir = root / f"cars_{split}"
            annotations = load_mat(files[split], "annotations")
            samples = []
            for record in annotations.reshape(-1):
                path, label = image_dir / str(record["fname"]), int(record["class"]) - 1
                if not 0 <= label < len(self.classes):
                    raise ValueError(
                        f"{files[split]}: {path.name} has class {label + 1}, outside 1..{len(self.classes)} of "
                        f"{files['meta'].name}; the annotation files do not belong together."
                    )
                if path.is_file():
                    samples.append((path, label))
                else:
                    problems["missing image files listed in the annotations"].append(str(path))
            out[split] = samples
        return out

    def _folders(self, root: Path, splits: list[str], problems: dict[str, list[str]]) -> dict[str, list[Sample]]:
        absent = [str(root / s) for s in ("train", "test") if not (root / s).is_dir()]
        if absent:
            raise FileNotFoundError(f"Stanford Cars class-folder layout in {root} lacks {', '.join(absent)}.")
        found = {s: {d.name for d in (root / s).iterdir() if d.is_dir()} for s in ("train", "test")}
        self.classes = list(CLASS_NAMES)
        expected = {folder_name(name) for name in self.classes}
        unknown = sorted(str(root / s / name) for s in ("train", "test") for name in found[s] - expected)
        if unknown:
            raise ValueError(
                f"Stanford Cars in {root}: {len(unknown)} class folders are not among its 196 classes: "
                f"{', '.join(unknown[:SHOWN])}{', ...' if len(unknown) > SHOWN else ''}. Name each folder after its "
                f"class in cars_meta.mat ('/' written '-'), e.g. '{folder_name(self.classes[0])}' (the names are in "
                f"{Path(__file__).with_name('cars_classes.txt')})."
            )
        out = {}
        for split in splits:
            samples = []
            for label, name in enumerate(self.classes):
                folder = root / split / folder_name(name)
                if folder.name not in found[split]:
                    problems["missing class folders"].append(str(folder))
                    continue
                files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
                if not files:
                    problems["class folders without images"].append(str(folder))
                samples += [(p, label) for p in files]
            out[split] = samples
        return out

    def _check(self, samples: dict[str, list[Sample]], problems: dict[str, list[str]]) -> dict[str, list[Sample]]:
        paths = sorted({path for items in samples.values() for path, _ in items})
        with ThreadPoolExecutor(max_workers=max(1, self.num_workers)) as pool:  # PIL decodes without the GIL
            reasons = dict(zip(paths, pool.map(unreadable, paths)))
        for path, reason in reasons.items():
            if reason is not None:
                problems["unreadable images"].append(f"{path} ({reason})")
        return {split: [s for s in items if reasons[s[0]] is None] for split, items in samples.items()}

    def setup(self, stage: str) -> None:
        """Index the images of this stage's splits and check them (``fit``: train and test, else test)."""
        splits = [s for s in (["train", "test"] if stage == "fit" else ["test"]) if s not in self.samples]
        if not splits:
            return
        layout, root = self._resolve_layout()
        problems: dict[str, list[str]] = {
            "missing image files listed in the annotations": [],
            "missing class folders": [],
            "class folders without images": [],
            "unreadable images": [],
        }
        samples = (self._devkit if layout == "devkit" else self._folders)(root, splits, problems)
        if self.check_images:
            samples = self._check(samples, problems)
        report = "; ".join(
            f"{len(items)} {kind}: {', '.join(items[:SHOWN])}{', ...' if len(items) > SHOWN else ''}"
            for kind, items in problems.items() if items
        )
        if report and not self.skip_bad:
            raise RuntimeError(
                f"Stanford Cars in {root} ({layout} layout) has problems: {report}. Restore or remove those files "
                "(and fix the annotations or class folders), or set data.init_args.skip_bad=true to train without "
                "them."
            )
        if report:
            rank_zero_warn(f"Stanford Cars in {root}: skipping what cannot be used (skip_bad=true): {report}.")
        for split, items in samples.items():
            if not items:
                raise RuntimeError(f"Stanford Cars in {root}: no usable images left in the {split} split.")
            self.samples[split] = items

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.samples:
            raise RuntimeError(f"StanfordCarsDataModule: call setup() for the {split!r} split before its dataloader.")
        transform = train_transform(self.image_size) if train else eval_transform(self.image_size)
        return DataLoader(
            ImageFiles(self.samples[split], transform, self._min_side),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", train=True)
        world_size = rank_world(self.trainer)[1]
        per_device = math.ceil(len(self.samples["train"]) / world_size)  # DistributedSampler pads
        if self.drop_last and per_device < self.batch_size:
            raise ValueError(
                f"Stanford Cars: {per_device} training images per device are fewer than one batch of "
                f"batch_size={self.batch_size} with drop_last=true: no training step. Lower batch_size or set "
                "drop_last=false."
            )
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def tta_augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The training augmentation on a normalised evaluation batch, image by image, on its device (for TTA).

        The evaluation images are already resized and centre-cropped, so the zoom and crop act inside that crop
        rather than on the full photo as during training. The draws are seeded from ``generator``.
        """
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        pixels = (images.float() * std + mean).clamp(0.0, 1.0)
        seed = int(torch.randint(2**62, (1,), generator=generator))
        # torchvision draws its random parameters from the global CPU generator: fork it so TTA repeats
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            augmented = torch.stack([self._augment(image) for image in pixels])
        return ((augmented - mean) / std).to(images.dtype)
