"""The vision zoo under DDP (2 CPU processes, gloo): validation metrics equal one process's, each image counted once."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_adamw.cli import import_zoo

import_zoo(Path(__file__).resolve().parents[1])
from datamodules.cifar10 import CIFAR10DataModule  # noqa: E402
from models.classifier import ImageClassifier  # noqa: E402
from models.wrn import WideResNet  # noqa: E402


def validate(devices: int, shared_data: Path, tmp_path: Path) -> dict[str, float]:
    torch.manual_seed(0)
    model = ImageClassifier(WideResNet(depth=10, width=1))
    # 101 images: two ranks get 51 and 50, where a padding sampler would count one image twice
    data = CIFAR10DataModule(data_dir=str(shared_data / "cifar10"), download=False, eval_subset=101, batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.validate(model, data)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_two_process_validation_counts_each_image_once(shared_data: Path, tmp_path: Path) -> None:
    single = validate(1, shared_data, tmp_path)
    ddp = validate(2, shared_data, tmp_path)
    assert ddp["val/acc"] == pytest.approx(single["val/acc"], abs=1e-7)
    assert ddp["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)
