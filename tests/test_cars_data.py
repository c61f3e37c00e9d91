"""Stanford Cars datamodule on the 240 shared real images: both layouts, and every kind of bad input reported early."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from torchvision.datasets import StanfordCars

from lightning_adamw.cli import import_zoo

import_zoo(Path(__file__).resolve().parents[1])  # the zoo runs from the checkout: put it on sys.path

from datamodules.cars import (  # noqa: E402
    CLASS_NAMES,
    WHERE_TO_GET,
    StanfordCarsDataModule,
    eval_transform,
    folder_name,
    open_rgb,
    train_transform,
)

N_TRAIN, N_TEST = 200, 40  # the shared 240 images: 1..200 as training images, 201..240 as "test" images


def annotations(shared_data: Path) -> np.ndarray:
    """The official training annotations, unsqueezed (as ``savemat`` writes them back)."""
    return scipy.io.loadmat(shared_data / "stanford_cars" / "devkit" / "cars_train_annos.mat")["annotations"]


def image(shared_data: Path, number: int) -> Path:
    return shared_data / "stanford_cars" / "cars_train" / f"{number:05d}.jpg"


def devkit(shared_data: Path, root: Path, extra_train: np.ndarray | None = None) -> Path:
    """A devkit layout in ``root`` whose trimmed annotations list only the images linked there."""
    src = annotations(shared_data)
    for folder in ("devkit", "cars_train", "cars_test"):
        (root / folder).mkdir(parents=True)
    os.symlink(shared_data / "stanford_cars" / "devkit" / "cars_meta.mat", root / "devkit" / "cars_meta.mat")
    train = src[:, :N_TRAIN] if extra_train is None else np.concatenate([src[:, :N_TRAIN], extra_train], axis=1)
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": train})
    scipy.io.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": src[:, N_TRAIN:N_TRAIN + N_TEST]})
    for number in range(1, N_TRAIN + N_TEST + 1):
        split = "cars_train" if number <= N_TRAIN else "cars_test"
        os.symlink(image(shared_data, number), root / split / f"{number:05d}.jpg")
    return root


def class_names(shared_data: Path) -> list[str]:
    meta = scipy.io.loadmat(shared_data / "stanford_cars" / "devkit" / "cars_meta.mat", squeeze_me=True)
    return [str(name) for name in meta["class_names"]]


def folders(shared_data: Path, root: Path) -> dict[str, dict[str, int]]:
    """Class folders for the classes with at least two shared images: one image to test/, the rest to train/."""
    names = class_names(shared_data)
    by_class: dict[str, list[int]] = defaultdict(list)
    for number, record in enumerate(annotations(shared_data)[0, :N_TRAIN + N_TEST], start=1):
        by_class[names[int(record["class"].item()) - 1].replace("/", "-")].append(number)
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for name, numbers in by_class.items():
        if len(numbers) < 2:
            continue
        for split, chosen in (("test", numbers[:1]), ("train", numbers[1:])):
            (root / split / name).mkdir(parents=True)
            for number in chosen:
                os.symlink(image(shared_data, number), root / split / name / f"{number:05d}.jpg")
            counts[split][name] = len(chosen)
    return counts


def every_class(shared_data: Path, root: Path) -> None:
    """A folder for each of the 196 classes in train/ and test/, each holding one shared image (any of them)."""
    for label, name in enumerate(CLASS_NAMES):
        for split, number in (("train", label % N_TRAIN + 1), ("test", N_TRAIN + label % N_TEST + 1)):
            (root / split / folder_name(name)).mkdir(parents=True)
            os.symlink(image(shared_data, number), root / split / folder_name(name) / f"{number:05d}.jpg")


def small(data_dir: Path, **kwargs: object) -> StanfordCarsDataModule:
    return StanfordCarsDataModule(data_dir=str(data_dir), image_size=32, batch_size=4, num_workers=0, **kwargs)


def truncated_copy(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------- layouts
def test_devkit_layout_matches_torchvision_and_loads_batches(shared_data: Path, tmp_path: Path) -> None:
    root = devkit(shared_data, tmp_path / "stanford_cars")
    dm = small(tmp_path)  # torchvision's root (the folder above stanford_cars/) works too
    dm.setup("fit")
    assert dm.num_classes == 196 and dm.classes[0] == "AM General Hummer SUV 2000"
    for split, count in (("train", N_TRAIN), ("test", N_TEST)):
        reference = StanfordCars(str(tmp_path), split=split)._samples
        assert [(str(p), label) for p, label in dm.samples[split]] == reference
        assert len(reference) == count
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.long
    first, second = (next(iter(dm.val_dataloader()))[0] for _ in range(2))
    assert torch.equal(first, second)  # evaluation: resize, centre crop, no randomness
    assert dm.samples["test"][0][0] == root / "cars_test" / f"{N_TRAIN + 1:05d}.jpg"


def test_an_epoch_keeps_the_last_incomplete_batch_as_the_study(shared_data: Path, tmp_path: Path) -> None:
    # the study's loader keeps the last short batch (Cars: 64 steps per epoch at batch 128, not 63)
    devkit(shared_data, tmp_path)
    dm = StanfordCarsDataModule(data_dir=str(tmp_path), image_size=32, batch_size=64, num_workers=0,
                                check_images=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 4  # 200 images: 64, 64, 64, 8
    assert not loader.drop_last
    dropping = StanfordCarsDataModule(data_dir=str(tmp_path), image_size=32, batch_size=64, num_workers=0,
                                      check_images=False, drop_last=True)
    dropping.setup("fit")
    assert len(dropping.train_dataloader()) == 3


def test_class_folder_layout(shared_data: Path, tmp_path: Path) -> None:
    counts = folders(shared_data, tmp_path)  # only the classes with two shared images: the others are reported
    dm = small(tmp_path, skip_bad=True)
    with pytest.warns(UserWarning, match=f"{2 * (196 - len(counts['train']))} missing class folders"):
        dm.setup("fit")
    # labels are cars_meta.mat's, as in the devkit layout, not the order of the folders present
    assert dm.classes == class_names(shared_data) == list(CLASS_NAMES) and dm.num_classes == 196
    for split in ("train", "test"):
        assert len(dm.samples[split]) == sum(counts[split].values())
        assert all(path.parent.name == folder_name(dm.classes[label]) for path, label in dm.samples[split])
    assert next(iter(dm.train_dataloader()))[0].shape == (4, 3, 32, 32)


def test_a_missing_class_folder_is_named_and_shifts_no_label(shared_data: Path, tmp_path: Path) -> None:
    every_class(shared_data, tmp_path)
    gone = CLASS_NAMES[100]
    for split in ("train", "test"):
        for path in (tmp_path / split / gone).iterdir():
            path.unlink()
        (tmp_path / split / gone).rmdir()
    with pytest.raises(RuntimeError) as err:
        small(tmp_path, check_images=False).setup("fit")
    assert f"2 missing class folders: {tmp_path / 'train' / gone}, {tmp_path / 'test' / gone}" in str(err.value)
    dm = small(tmp_path, check_images=False, skip_bad=True)
    with pytest.warns(UserWarning, match="2 missing class folders"):
        dm.setup("fit")
    assert dm.num_classes == 196
    labels = {path.parent.name: label for path, label in dm.samples["train"]}
    assert len(labels) == 195 and 100 not in labels.values()
    assert all(labels[folder_name(name)] == i for i, name in enumerate(CLASS_NAMES) if i != 100)


def test_a_folder_of_no_class_is_named(shared_data: Path, tmp_path: Path) -> None:
    every_class(shared_data, tmp_path)
    (tmp_path / "train" / folder_name(CLASS_NAMES[5])).rename(tmp_path / "train" / "Acura TL Sedan")
    with pytest.raises(ValueError, match=r"1 class folders are not among its 196 classes: .*train/Acura TL Sedan\."):
        small(tmp_path, check_images=False).setup("fit")


def test_missing_dataset_gives_both_layouts_and_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        small(tmp_path / "nowhere").setup("fit")
    message = str(err.value)
    for expected in ("devkit/cars_meta.mat", "cars_test_annos_withlabels.mat", "train/<class name>/*.jpg",
                     "pytorch/vision#7545", "data_dir"):
        assert expected in message


def test_tta_augment_keeps_shape_and_repeats(shared_data: Path, tmp_path: Path) -> None:
    devkit(shared_data, tmp_path)
    dm = small(tmp_path)
    dm.setup("test")
    images, _ = next(iter(dm.test_dataloader()))
    a = dm.tta_augment(images, torch.Generator().manual_seed(0))
    b = dm.tta_augment(images, torch.Generator().manual_seed(0))
    assert a.shape == images.shape and a.dtype == images.dtype
    assert torch.equal(a, b) and not torch.allclose(a, images)


# ---------------------------------------------------------------------------------------------- bad input
def test_shared_annotations_report_the_missing_images_by_name(shared_data: Path) -> None:
    # the shared folder holds 240 of the 8,144 training images and no test images, but lists them all
    dm = small(shared_data / "stanford_cars", check_images=False)
    with pytest.raises(RuntimeError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert f"{8144 - 240 + 8041} missing image files listed in the annotations" in message
    assert "cars_train/00241.jpg" in message and "skip_bad=true" in message
    skipping = small(shared_data / "stanford_cars", check_images=False, skip_bad=True)
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(RuntimeError, match="no usable images left in the"):
        skipping.setup("fit")


def test_corrupt_and_missing_files_are_reported_before_training_or_skipped(shared_data: Path, tmp_path: Path) -> None:
    extra = annotations(shared_data)[:, :1].copy()
    extra[0, 0]["fname"] = np.array(["99999.jpg"])
    root = devkit(shared_data, tmp_path, extra_train=extra)
    (root / "cars_train" / "00007.jpg").unlink()
    truncated_copy(image(shared_data, 7), root / "cars_train" / "00007.jpg")
    (root / "cars_train" / "00008.jpg").unlink()
    (root / "cars_train" / "00008.jpg").write_text("not a jpeg")
    with pytest.raises(RuntimeError) as err:
        small(root).setup("fit")
    message = str(err.value)
    assert "1 missing image files listed in the annotations" in message and "99999.jpg" in message
    assert "2 unreadable images" in message and "00007.jpg" in message and "00008.jpg" in message

    dm = small(root, skip_bad=True)
    with pytest.warns(UserWarning, match="1 missing image files.*2 unreadable images"):
        dm.setup("fit")
    assert len(dm.samples["train"]) == N_TRAIN - 2
    for _ in dm.train_dataloader():  # every remaining file decodes
        pass


def test_without_the_check_a_bad_image_is_named_when_read(shared_data: Path, tmp_path: Path) -> None:
    root = devkit(shared_data, tmp_path)
    (root / "cars_test" / f"{N_TRAIN + 1:05d}.jpg").unlink()
    truncated_copy(image(shared_data, N_TRAIN + 1), root / "cars_test" / f"{N_TRAIN + 1:05d}.jpg")
    dm = small(root, check_images=False)
    dm.setup("test")
    with pytest.raises(RuntimeError, match=f"Could not read image .*{N_TRAIN + 1:05d}.jpg"):
        next(iter(dm.test_dataloader()))


def test_empty_and_missing_class_folders_are_reported(shared_data: Path, tmp_path: Path) -> None:
    every_class(shared_data, tmp_path)
    first, second = (folder_name(name) for name in CLASS_NAMES[:2])
    for path in (tmp_path / "train" / first).iterdir():
        path.unlink()
    for path in (tmp_path / "test" / second).iterdir():
        path.unlink()
    (tmp_path / "test" / second).rmdir()
    with pytest.raises(RuntimeError) as err:
        small(tmp_path).setup("fit")
    message = str(err.value)
    assert f"1 class folders without images: {tmp_path / 'train' / first}" in message
    assert f"1 missing class folders: {tmp_path / 'test' / second}" in message


@pytest.mark.parametrize("size", [224, 32])
def test_transforms_give_square_images_of_the_requested_size(shared_data: Path, size: int) -> None:
    photo = open_rgb(image(shared_data, 5), size)  # 119 x 63: smaller than the crop and far from square
    assert photo.size == (119, 63)
    for _ in range(5):
        assert train_transform(size)(photo).shape == (3, size, size)
    assert eval_transform(size)(photo).shape == (3, size, size)


def test_an_unreadable_annotation_file_is_named(shared_data: Path, tmp_path: Path) -> None:
    root = devkit(shared_data, tmp_path)
    (root / "devkit" / "cars_train_annos.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(ValueError, match=f"annotation file {root / 'devkit' / 'cars_train_annos.mat'} cannot be read"):
        small(root).setup("fit")


def test_download_true_gives_where_to_get_it() -> None:
    with pytest.raises(ValueError, match="cannot be downloaded automatically") as err:
        StanfordCarsDataModule(download=True)
    assert WHERE_TO_GET in str(err.value)


def test_fewer_images_than_one_batch_with_drop_last_is_refused(shared_data: Path, tmp_path: Path) -> None:
    devkit(shared_data, tmp_path)
    dm = StanfordCarsDataModule(data_dir=str(tmp_path), image_size=32, batch_size=256, num_workers=0,
                                check_images=False, drop_last=True)
    dm.setup("fit")
    with pytest.raises(ValueError, match="200 training images per device are fewer than one batch of batch_size=256 "
                                         "with drop_last=true"):
        dm.train_dataloader()
