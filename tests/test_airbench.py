"""The airbench94 network (models/airbench.py), its data options and its config (configs/cifar10_fast.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from lightning_adamw import OptimizerConfig
from lightning_adamw.cli import import_zoo, main
from lightning_adamw.registry import DECOUPLED_WD_KEY, build_optimizer

ROOT = Path(__file__).resolve().parents[1]
import_zoo(ROOT)

from datamodules.cifar10 import CIFAR10DataModule, DeviceBatches, normalize  # noqa: E402
from models.airbench import AirbenchNet, PatchWhitening  # noqa: E402
from models.classifier import ImageClassifier, mirror_translate_logits  # noqa: E402

CONFIG = ROOT / "configs" / "cifar10_fast.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_adamw"])


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    """300 normalised real CIFAR-10 training images."""
    import os
    shared = Path(os.environ.get("LIGHTNING_ADAMW_SHARED_DATA", ROOT.parent / "shared" / "data"))
    data = CIFAR10DataModule(data_dir=str(shared / "cifar10"), download=False, train_subset=300)
    data.setup("fit")
    return data.train_images()


def patch_outputs(whiten: PatchWhitening, images: torch.Tensor) -> torch.Tensor:
    """The whitening's outputs without bias, in float64, as (positions, channels)."""
    out = F.conv2d(images.double(), whiten.weight.double())
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])


def test_whitened_training_patches_have_identity_covariance(train_images: torch.Tensor) -> None:
    whiten = PatchWhitening(eps=1e-9)
    eigenvalues = whiten.fit(train_images)
    out = patch_outputs(whiten, train_images)
    covariance = torch.cov(out[:, :12].T)
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=2e-5, rtol=0)
    torch.testing.assert_close(out[:, 12:], -out[:, :12])  # the negatives
    assert bool(whiten.fitted) and torch.all(eigenvalues[:-1] >= eigenvalues[1:])
    # with airbench's eps the gains are 1 / sqrt(lambda + eps): covariance diag(lambda / (lambda + eps))
    published = PatchWhitening(eps=5e-4)
    published.fit(train_images)
    covariance = torch.cov(patch_outputs(published, train_images)[:, :12].T)
    torch.testing.assert_close(covariance, torch.diag(eigenvalues / (eigenvalues + 5e-4)), atol=2e-5, rtol=0)


def test_first_conv_of_each_group_passes_its_input_channels_through() -> None:
    torch.manual_seed(0)
    net = AirbenchNet()
    for group in net.groups:
        conv = group.conv1
        x = torch.randn(2, conv.in_channels, 9, 9)
        torch.testing.assert_close(conv(x)[:, :conv.in_channels], x)
        y = torch.randn(2, conv.out_channels, 5, 5)
        torch.testing.assert_close(group.conv2(y), y)  # square: the identity on every channel
        assert conv.bias is None and group.conv2.bias is None


def test_parameter_count_shapes_and_frozen_parts() -> None:
    net = AirbenchNet()
    convs = 24 * 64 * 9 + 64 * 64 * 9 + 64 * 256 * 9 + 256 * 256 * 9 + 2 * 256 * 256 * 9
    norms = 2 * 2 * (64 + 256 + 256)
    assert sum(p.numel() for p in net.parameters()) == 24 + convs + norms + 256 * 10  # 1.97 M (airbench)
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {f"groups.{g}.norm{i}.weight" for g in range(3) for i in (1, 2)}
    assert "whiten.weight" in net.state_dict() and "whiten.fitted" in net.state_dict()
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert net.groups[0].norm1.momentum == 0.4


def test_channels_last_gives_the_same_outputs(train_images: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = AirbenchNet(widths=(8, 16, 16))
    net.init_from_data(train_images[:50])
    net.eval()
    x = train_images[:4]
    expected = net(x)
    net.to(memory_format=torch.channels_last)
    assert net.whiten.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5, rtol=1e-4)


def test_whitening_bias_trains_only_for_its_epochs() -> None:
    net = AirbenchNet(widths=(8, 16, 16), whiten_bias_epochs=3)
    assert [(net.set_epoch(e), net.whiten.bias.requires_grad)[1] for e in range(5)] == [True] * 3 + [False] * 2


def test_layer_groups_give_batchnorm_biases_their_own_lr_and_decay() -> None:
    net = AirbenchNet(widths=(8, 16, 16))
    optimizer = OptimizerConfig("sgd", lr=[96.0, 1.5], weight_decay=[1e-4, 8e-3], wd_mode="decoupled",
                                momentum=0.85, kwargs={"nesterov": True}).build(net.layer_groups())
    norm_params = {id(p) for m in net.norm_biases() for p in m.parameters()}
    first, rest = optimizer.param_groups
    assert {id(p) for p in first["params"]} == norm_params
    assert (first["lr"], first[DECOUPLED_WD_KEY], rest["lr"], rest[DECOUPLED_WD_KEY]) == (96.0, 1e-4, 1.5, 8e-3)
    assert first["nesterov"] and first["weight_decay"] == 0.0
    l2 = build_optimizer(net.layer_groups(), "sgd", lr=[96.0, 1.5], weight_decay=[1e-4, 8e-3], wd_mode="l2")
    assert [g["weight_decay"] for g in l2.param_groups] == [1e-4, 8e-3]
    with pytest.raises(ValueError, match="2 weight decays for 1 layer groups"):
        build_optimizer(net, "sgd", lr=0.1, weight_decay=[0.1, 0.2])


def test_mirror_translate_tta_matches_numpy_views() -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    weights = torch.randn(3 * 6 * 5, 4, dtype=torch.float64)

    def net(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ weights

    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    views = [images.numpy(), padded[..., :6, :5], padded[..., 2:, 2:]]
    expected = sum(w * (net(torch.from_numpy(v.copy())) + net(torch.from_numpy(v[..., ::-1].copy())))
                   for w, v in zip((0.25, 0.125, 0.125), views))
    torch.testing.assert_close(mirror_translate_logits(net, images, net(images)), expected.float())  # fp32 out
    assert torch.equal(torch.from_numpy(padded[..., :6, :5])[..., 1:, 1:], images[..., :-1, :-1])  # 1 px shift


def test_mirror_translate_refuses_tta_passes() -> None:
    with pytest.raises(ValueError, match="tta_passes=4 has no effect"):
        ImageClassifier(AirbenchNet(widths=(8, 16, 16)), tta=True, tta_mode="mirror_translate", tta_passes=4)


def test_alternating_flip_flips_each_image_the_other_way_every_epoch() -> None:
    n = 64
    images = torch.arange(n * 3 * 2 * 4, dtype=torch.uint8).view(n, 3, 2, 4)  # no image is its own mirror
    bits = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.5
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DeviceBatches(images, torch.arange(n), 10, sampler, drop_last=False, flip_bits=bits)
    flipped = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        state = torch.empty(n, dtype=torch.bool)
        for batch, index in loader:
            assert all(torch.equal(b, images[i]) or torch.equal(b, images[i].flip(2)) for b, i in zip(batch, index))
            state[index] = torch.tensor([torch.equal(b, images[i].flip(2)) for b, i in zip(batch, index)])
        flipped.append(state)
    assert torch.equal(flipped[0], bits) and 0 < bits.sum() < n
    for before, after in zip(flipped, flipped[1:]):
        assert torch.equal(after, ~before)


def test_alternating_flip_datamodule_crops_without_flipping(shared_data: Path) -> None:
    data = CIFAR10DataModule(data_dir=str(shared_data / "cifar10"), download=False, train_subset=32, pad=0,
                             flip="alternating", padding_mode="reflect", batch_size=32)
    data.setup("fit")
    loader = data.train_dataloader()
    assert loader.flip_bits is not None and loader.flip_bits.shape == (32,)
    images = data.splits["train"][0][:8]
    torch.testing.assert_close(data.batch_transform(images, train=True), normalize(images))  # pad 0: no crop
    with pytest.raises(ValueError, match="flip='alternating' needs loader='device'"):
        CIFAR10DataModule(loader="torchvision", flip="alternating")


def test_config_holds_the_published_values() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    model = config["model"]["init_args"]
    net = model["net"]["init_args"]
    assert net["widths"] == [64, 256, 256] and net["head_scale"] == pytest.approx(1 / 9)
    assert net["bn_momentum"] == pytest.approx(1 - 0.6)
    optimizer = model["optimizer"]
    lr = 11.5 / (1 + 1 / (1 - 0.85))  # airbench's lr per 1024 examples on a summed loss, as a mean-loss lr
    assert optimizer["lr"] == pytest.approx([64 * lr, lr], rel=1e-3)
    per_step_decay = 0.0153 / (1 + 1 / (1 - 0.85)) / (1 - 0.85)  # into the momentum, its steady-state amplification
    assert optimizer["weight_decay"] == pytest.approx([per_step_decay / (64 * lr), per_step_decay / lr], rel=1e-3)
    assert (model["label_smoothing"], model["tta_mode"], config["trainer"]["precision"]) == (
        0.2, "mirror_translate", "bf16-mixed")
    data = config["data"]["init_args"]
    assert (data["batch_size"], data["pad"], data["padding_mode"], data["flip"]) == (1024, 2, "reflect", "alternating")


def test_config_trains_one_epoch_and_reloads_without_data(shared_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = ["--data.init_args.data_dir", str(shared_data / "cifar10"), "--data.init_args.download", "false",
            "--data.init_args.train_subset", "128", "--data.init_args.eval_subset", "32",
            "--data.init_args.batch_size", "64", "--trainer.enable_progress_bar", "false"]
    cli = main(["fit", "--config", str(CONFIG), "--trainer.max_epochs", "1",
                "--model.init_args.net.init_args.init_images", "128", *data])
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "val/acc", "val/acc_tta", "lr/pg0", "lr/pg1"} <= set(metrics)
    assert "momentum" in {k.split("/")[0] for k in metrics}
    assert float(metrics["lr/pg0"]) == pytest.approx(64 * float(metrics["lr/pg1"]))
    assert torch.isfinite(metrics["train/loss"])
    net = cli.model.net
    assert net.data_initialized and net.whiten.weight.is_contiguous(memory_format=torch.channels_last)
    assert cli.trainer.precision == "bf16-mixed"
    expected = AirbenchNet(init_images=128)
    expected.init_from_data(cli.datamodule.train_images(128))
    torch.testing.assert_close(net.whiten.weight, expected.whiten.weight)  # fitted on the first 128 images
    checkpoint = tmp_path / "runs" / "cifar10_fast" / "version_0" / "checkpoints" / "last.ckpt"
    model = ImageClassifier.load_from_checkpoint(checkpoint, net=AirbenchNet())
    assert model.net.data_initialized
    torch.testing.assert_close(model.net.whiten.weight, net.whiten.weight)


def test_config_prints(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["net"]["class_path"] == "models.airbench.AirbenchNet"
