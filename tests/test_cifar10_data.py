"""CIFAR-10 datamodule on the real data: both loaders, the same augmentation distribution, DDP shards, bad input."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import v2

from lightning_adamw.cli import import_zoo

import_zoo(Path(__file__).resolve().parents[1])  # the zoo runs from the checkout: put it on sys.path

from datamodules.cifar10 import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_URL,
    CIFAR10DataModule,
    PILImages,
    crop_flip,
    normalize,
    random_crop_flip,
    train_transform,
)


def fake_trainer(training: bool = True, rank: int = 0, world_size: int = 1) -> SimpleNamespace:
    """The attributes of a Trainer the datamodule reads."""
    return SimpleNamespace(training=training, global_rank=rank, world_size=world_size,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


@pytest.fixture(scope="module")
def cifar(shared_data: Path) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(data_dir=str(shared_data / "cifar10"), download=False)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("mode", ["symmetric", "reflect"])
def test_crop_flip_matches_numpy_padding_per_image(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=gen, dtype=torch.float64)
    top, left = torch.randint(0, 9, (2, 6), generator=gen)
    top[0], left[0] = 0, 8  # the corners, where the two modes differ
    flip = torch.tensor([True, False, True, False, True, False])
    out = crop_flip(images, top, left, flip, mode=mode)
    for i in range(6):
        padded = torch.from_numpy(np.pad(images[i].numpy(), ((0, 0), (4, 4), (4, 4)), mode=mode))
        crop = padded[:, top[i]:top[i] + 32, left[i]:left[i] + 32]
        torch.testing.assert_close(out[i], crop.flip(-1) if flip[i] else crop)


def test_default_padding_repeats_the_edge_pixel_as_the_studys_loader() -> None:
    # fastai 0.7 pads with OpenCV BORDER_REFLECT: the pixel just outside the edge is the edge pixel itself
    images = torch.arange(32.0).view(1, 1, 1, 32).expand(1, 3, 32, 32)
    at = torch.tensor([4]), torch.tensor([2]), torch.tensor([False])  # two columns of padding on the left
    assert crop_flip(images, *at)[0, 0, 0, :3].tolist() == [1.0, 0.0, 0.0]
    assert crop_flip(images, *at, mode="reflect")[0, 0, 0, :3].tolist() == [2.0, 1.0, 0.0]
    dm = CIFAR10DataModule(seed=0)
    assert dm.padding_mode == "symmetric"
    # the torchvision path pads the same way: padded columns 0..4 of the probe's green channel (8 * column)
    crop = train_transform(dm.padding_mode).transforms[0]
    padded = np.asarray(v2.Pad(4, padding_mode=crop.padding_mode)(Image.fromarray(probe())))
    assert padded[4, :5, 1].tolist() == [24, 16, 8, 0, 0]


def test_flip_acts_on_the_width_axis() -> None:
    images = torch.randn(2, 3, 32, 32)
    centre = torch.full((2,), 4)
    torch.testing.assert_close(crop_flip(images, centre, centre, torch.tensor([True, True])), images.flip(3))
    torch.testing.assert_close(crop_flip(images, centre, centre, torch.tensor([False, False])), images)
    # the PIL path's flip is the same axis: a left-right mirror of the PIL image
    array = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    flipped = v2.functional.pil_to_tensor(v2.RandomHorizontalFlip(p=1.0)(Image.fromarray(array)))
    assert torch.equal(flipped, torch.from_numpy(array).permute(2, 0, 1).flip(2))


def probe() -> np.ndarray:
    """A 32x32 image whose red channel is 8 * row and green 8 * column: every crop and flip is recoverable."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([8 * rows, 8 * cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)


def recover(batch: torch.Tensor) -> np.ndarray:
    """(top, left, flip) of each augmented probe, from its normalised pixels."""
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    pixels = ((batch * std + mean) * 255).round().long()
    red, green = pixels[:, 0, 16, 16] // 8, pixels[:, 1, 16, 16] // 8
    flip = pixels[:, 1, 16, 17] < pixels[:, 1, 16, 16]
    top, left = red - 12, green - 12 + flip.long()  # an interior pixel: no reflection involved
    return torch.stack([top, left, flip.long()], dim=1).numpy()


def histogram(params: np.ndarray) -> np.ndarray:
    assert params[:, :2].min() >= 0 and params[:, :2].max() <= 8
    return np.bincount(params[:, 0] * 18 + params[:, 1] * 2 + params[:, 2], minlength=162)


def test_device_path_and_pil_path_draw_the_same_crops_and_flips() -> None:
    n = 4860  # 30 draws per (top, left, flip) cell on average
    torch.manual_seed(0)  # torchvision's transforms draw from the global generator
    pil = PILImages(torch.from_numpy(probe()).permute(2, 0, 1).unsqueeze(0), torch.zeros(1, dtype=torch.long),
                    train_transform())
    pil_params = recover(torch.stack([pil[0][0] for _ in range(n)]))

    dm = CIFAR10DataModule(seed=1)
    batch = torch.from_numpy(probe()).permute(2, 0, 1).unsqueeze(0).expand(n, -1, -1, -1)
    fast_params = recover(dm.batch_transform(batch, train=True))

    table = np.stack([histogram(pil_params), histogram(fast_params)])
    assert (table > 0).all()  # all 81 offsets x 2 flips occur in both
    assert stats.chi2_contingency(table).pvalue > 1e-3  # same distribution
    for row in table:
        assert stats.chisquare(row).pvalue > 1e-3  # uniform over the 162 cells
    assert abs(pil_params[:, 2].mean() - 0.5) < 0.03 and abs(fast_params[:, 2].mean() - 0.5) < 0.03


def test_random_crop_flip_repeats_with_the_same_generator() -> None:
    images = torch.randn(4, 3, 32, 32)
    a = random_crop_flip(images, torch.Generator().manual_seed(5))
    b = random_crop_flip(images, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, images)


# ---------------------------------------------------------------------------------------------- the real data
def test_real_splits_in_torchvision_format(cifar: CIFAR10DataModule) -> None:
    train_images, train_labels = cifar.splits["train"]
    val_images, val_labels = cifar.splits["val"]
    assert train_images.shape == (50_000, 3, 32, 32) and train_images.dtype == torch.uint8
    assert val_images.shape == (10_000, 3, 32, 32)  # validation is the test set, as in the study
    assert torch.bincount(train_labels).tolist() == [5000] * 10
    assert torch.bincount(val_labels).tolist() == [1000] * 10
    assert val_labels[:4].tolist() == [3, 8, 8, 0]  # the official test_batch order: cat, ship, ship, airplane
    assert cifar.classes[3] == "cat"


def test_device_batches_are_augmented_only_for_training(cifar: CIFAR10DataModule) -> None:
    cifar.trainer = fake_trainer(training=True)
    images, labels = next(iter(cifar.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (128, 3, 32, 32)
    train_out, same_labels = cifar.on_after_batch_transfer((images, labels), 0)
    assert train_out.dtype == torch.float32 and torch.equal(same_labels, labels)
    assert not torch.allclose(train_out, normalize(images))
    cifar.trainer.training = False
    val_images, _ = next(iter(cifar.val_dataloader()))
    val_out, _ = cifar.on_after_batch_transfer((val_images, labels), 0)
    torch.testing.assert_close(val_out, normalize(val_images))


def test_both_loaders_give_identical_evaluation_batches(shared_data: Path) -> None:
    kwargs = {"data_dir": str(shared_data / "cifar10"), "download": False, "eval_subset": 64, "batch_size": 32}
    device = CIFAR10DataModule(loader="device", **kwargs)
    torchvision_path = CIFAR10DataModule(loader="torchvision", num_workers=0, **kwargs)
    outputs = []
    for dm in (device, torchvision_path):
        dm.trainer = fake_trainer(training=False)
        dm.setup("test")
        batches = [dm.on_after_batch_transfer(b, 0) for b in dm.test_dataloader()]
        outputs.append((torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])))
    assert outputs[0][0].shape == (64, 3, 32, 32)
    torch.testing.assert_close(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])


def test_held_out_validation_and_subsets(shared_data: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(shared_data / "cifar10"), download=False, val_size=5000,
                           train_subset=2000, eval_subset=300, seed=7)
    dm.setup("fit")
    (train, _), (val, _) = dm.splits["train"], dm.splits["val"]
    assert (len(train), len(val)) == (2000, 300)
    # held-out images come from the training set, never from the training subset
    train_keys = {bytes(x.numpy()) for x in train}
    assert not any(bytes(x.numpy()) in train_keys for x in val)
    again = CIFAR10DataModule(data_dir=str(shared_data / "cifar10"), download=False, val_size=5000,
                              train_subset=2000, eval_subset=300, seed=7)
    again.setup("fit")
    assert torch.equal(again.splits["train"][0], train)


@pytest.mark.parametrize("loader", ["device", "torchvision"])
def test_an_epoch_keeps_the_last_incomplete_batch_as_the_study(shared_data: Path, loader: str) -> None:
    # the study's fastai 0.7 loader: 391 steps per CIFAR-10 epoch at batch 128, the last one of 80 images
    dm = CIFAR10DataModule(data_dir=str(shared_data / "cifar10"), download=False, loader=loader, num_workers=0)
    dm.setup("fit")
    dm.trainer = fake_trainer()
    assert len(dm.train_dataloader()) == 391
    dropping = CIFAR10DataModule(data_dir=str(shared_data / "cifar10"), download=False, loader=loader,
                                 num_workers=0, drop_last=True)
    dropping.splits = dm.splits
    dropping.trainer = fake_trainer()
    assert len(dropping.train_dataloader()) == 390
    if loader == "device":
        batches = list(dm.train_dataloader())
        assert [len(y) for _, y in batches[-2:]] == [128, 80]
        seen = torch.cat([y for _, y in batches])
        assert torch.equal(torch.bincount(seen), torch.bincount(dm.splits["train"][1]))  # every image once


def test_trainer_runs_the_last_short_batch(shared_data: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(shared_data / "cifar10"), download=False, batch_size=128,
                           train_subset=300, eval_subset=10)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    sizes: list[int] = []

    class Count(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            sizes.append(len(batch[1]))
            return (self.w * batch[0].mean()).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer.fit(Count(), dm)
    assert sizes == [128, 128, 44] and trainer.global_step == 3


def test_ddp_ranks_see_disjoint_shards_reshuffled_each_epoch(cifar: CIFAR10DataModule) -> None:
    n = len(cifar.splits["train"][1])
    shards = []
    for rank in range(3):
        cifar.trainer = fake_trainer(rank=rank, world_size=3)
        loader = cifar.train_dataloader()
        loader.sampler.set_epoch(0)
        order = list(loader.sampler)
        assert len(loader) == -(-len(order) // 128) == -(-(n // 3) // 128)  # the last, short batch is kept
        images, labels = next(iter(loader))
        assert torch.equal(labels, cifar.splits["train"][1][order[:128]])
        assert torch.equal(images, cifar.splits["train"][0][order[:128]])
        loader.sampler.set_epoch(1)
        assert list(loader.sampler) != order
        loader.sampler.set_epoch(0)
        assert list(loader.sampler) == order
        shards.append(set(order))
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert sum(len(s) for s in shards) == n - n % 3
    # evaluation: unshuffled and unpadded (every world_size-th image), so each image is counted exactly once
    cifar.trainer = fake_trainer(training=False, rank=2, world_size=3)
    assert list(cifar.val_dataloader().sampler)[:3] == [2, 5, 8]


class ShardProbe(pl.LightningModule):
    """Counts the training images each rank sees and fingerprints the validation images of every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.fingerprints: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, _ = batch
        self.log("train_images", float(len(images)), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)
        return self.layer(images.mean(dim=(1, 2, 3)).unsqueeze(1)).sum()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.fingerprints.append(batch[0].double().flatten(1) @ torch.linspace(1, 2, 3 * 32 * 32).double())

    def on_validation_epoch_end(self) -> None:
        everyone = self.all_gather(torch.cat(self.fingerprints)).flatten()
        self.fingerprints.clear()
        self.log("val_images", float(len(everyone)))
        self.log("val_distinct", float(len(torch.unique(everyone))))
        self.log("val_fingerprint_sum", float(everyone.sum()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_real_ddp_run_gives_each_rank_its_own_shard(shared_data: Path, tmp_path: Path) -> None:
    kwargs = {"data_dir": str(shared_data / "cifar10"), "download": False, "train_subset": 128, "eval_subset": 64,
              "batch_size": 16}
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(ShardProbe(), CIFAR10DataModule(**kwargs))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    reference = CIFAR10DataModule(**kwargs)
    reference.setup("fit")
    expected = normalize(reference.splits["val"][0]).double().flatten(1) @ torch.linspace(1, 2, 3 * 32 * 32).double()
    assert metrics["train_images"] == 128  # 64 per rank, 4 batches each
    assert metrics["val_images"] == metrics["val_distinct"] == 64  # two disjoint halves of the 64 images
    assert metrics["val_fingerprint_sum"] == pytest.approx(float(expected.sum()), rel=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
def test_absent_data_offline_names_the_folder_and_the_manual_step(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "cifar10"), download=True)
    with pytest.raises(RuntimeError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert "could not be downloaded" in message and CIFAR10_URL in message
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in message

    offline = CIFAR10DataModule(data_dir=str(tmp_path / "nothing"), download=False)
    offline.prepare_data()  # download off: nothing to do
    with pytest.raises(RuntimeError, match="was not found in .*data.init_args.download=true"):
        offline.setup("fit")


def test_corrupted_file_fails_the_md5_check(tmp_path: Path, shared_data: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for src in (shared_data / "cifar10" / "cifar-10-batches-py").iterdir():
        os.symlink(src, folder / src.name)
    (folder / "batches.meta").unlink()
    (folder / "batches.meta").write_bytes(b"not a pickle")
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    dm.prepare_data()  # every file is there: no download attempt
    with pytest.raises(RuntimeError, match=f"{folder / 'batches.meta'} fails the md5 check of the official release"):
        dm.setup("test")


def test_a_truncated_batch_and_a_missing_one_are_named_alone(tmp_path: Path, shared_data: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for src in (shared_data / "cifar10" / "cifar-10-batches-py").iterdir():
        if src.name == "data_batch_3":
            (folder / src.name).write_bytes(src.read_bytes()[:1_000_000])  # an interrupted copy: does not unpickle
        elif src.name != "data_batch_5":
            os.symlink(src, folder / src.name)
    with pytest.raises(RuntimeError) as err:
        CIFAR10DataModule(data_dir=str(tmp_path), download=False).setup("fit")
    message = str(err.value)
    assert f"{folder / 'data_batch_3'} fails the md5 check" in message and "data_batch_5 is missing" in message
    assert "data_batch_1" not in message and "test_batch" not in message


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="train_subset=49001 exceeds the 49000"):
        CIFAR10DataModule(val_size=1000, train_subset=49_001)
    with pytest.raises(ValueError, match="val_size"):
        CIFAR10DataModule(val_size=50_000)
