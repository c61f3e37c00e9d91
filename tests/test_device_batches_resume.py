"""The fast CIFAR-10 loader resumes mid-epoch: the same remaining batches and the same augmentation draws."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from lightning_adamw.cli import import_zoo

import_zoo(Path(__file__).resolve().parents[1])  # the zoo runs from the checkout: put it on sys.path

from datamodules.cifar10 import DeviceBatches, random_crop_flip  # noqa: E402


def loader(seed: int = 0) -> DeviceBatches:
    images = torch.arange(100 * 3 * 8 * 8, dtype=torch.int32).remainder(251).to(torch.uint8).view(100, 3, 8, 8)
    sampler = DistributedSampler(range(100), num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
    return DeviceBatches(images, torch.arange(100), batch_size=16, sampler=sampler, drop_last=False,
                         generator=torch.Generator().manual_seed(seed))


def augmented(batches: DeviceBatches, iterator: Iterator, count: int | None = None) -> list[tuple[Tensor, Tensor]]:
    """The next ``count`` batches (all left when None) of ``iterator``, augmented as the datamodule does."""
    out = []
    for images, labels in itertools.islice(iterator, count):
        out.append((random_crop_flip(images, batches.generator, pad=2), labels))
    return out


def test_resumed_mid_epoch_it_serves_the_rest_of_the_epoch_with_the_same_draws() -> None:
    full = loader()
    full.sampler.set_epoch(1)
    passing = iter(full)
    first = augmented(full, passing, 3)
    state = full.state_dict()
    rest = augmented(full, passing)  # the same pass goes on: batches 3-6 (the last one holds 4 images)
    assert len(first) + len(rest) == 7 and len(rest[-1][1]) == 4

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    again = augmented(resumed, iter(resumed))
    assert len(again) == len(rest)
    for (a_images, a_labels), (b_images, b_labels) in zip(again, rest):
        assert torch.equal(a_labels, b_labels) and torch.equal(a_images, b_images)

    full.sampler.set_epoch(2)
    resumed.sampler.set_epoch(2)  # the next epoch is whole, and its draws continue the same stream
    for (a_images, a_labels), (b_images, b_labels) in zip(augmented(resumed, iter(resumed)),
                                                                  augmented(full, iter(full)), strict=True):
        assert torch.equal(a_labels, b_labels) and torch.equal(a_images, b_images)
