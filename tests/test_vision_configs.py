"""Every vision config through the real CLI: --print_config, the recipe values, and fast_dev_run on the real data."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_adamw import OneCycleWD
from lightning_adamw.cli import import_zoo, main
from lightning_adamw.registry import DECOUPLED_WD_KEY

ROOT = Path(__file__).resolve().parents[1]
import_zoo(ROOT)  # the zoo runs from the checkout: put it on sys.path

from test_cars_data import devkit  # noqa: E402

CONFIGS = ROOT / "configs"
VISION = ["cifar10", "cifar10_tta", "cifar10_fast", "quickstart", "cars"]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI gets its arguments through ``args``; pytest's own command line must not look like extra ones."""
    monkeypatch.setattr(sys, "argv", ["lightning_adamw"])


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


#: Per network class of a CIFAR-10 config: the arguments that make it tiny.
TINY_NETS = {"WideResNet": {"depth": "10", "width": "1"},
             "AirbenchNet": {"widths": "[8, 16, 16]", "init_images": "16"}}


def cifar_overrides(shared_data: Path, tmp_path: Path, name: str = "cifar10") -> list[str]:
    """Real CIFAR-10 from the shared folder, a tiny version of config ``name``'s network and small batches, so that a
    step takes well under 1 s."""
    net = load(name)["model"]["init_args"]["net"]["class_path"].rsplit(".", 1)[-1]
    return [
        "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path),
        "--data.init_args.data_dir", str(shared_data / "cifar10"), "--data.init_args.download", "false",
        "--data.init_args.batch_size", "16",
        *(arg for key, value in TINY_NETS[net].items() for arg in (f"--model.init_args.net.init_args.{key}", value)),
    ]


def cars_overrides(shared_data: Path, tmp_path: Path) -> list[str]:
    """The 240 shared Cars images with trimmed annotations, no pretrained weights (offline), 32 px, batch 4."""
    root = devkit(shared_data, tmp_path / "stanford_cars")
    return [
        "--trainer.default_root_dir", str(tmp_path),
        "--data.init_args.data_dir", str(root), "--data.init_args.image_size", "32",
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--model.init_args.net.init_args.weights", "null",
    ]


@pytest.mark.parametrize("name", VISION)
def test_print_config(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "models.classifier.ImageClassifier"
    assert printed["trainer"]["callbacks"][0]["class_path"] == "lightning_adamw.OneCycleWD"


def test_configs_hold_the_recipe_values() -> None:
    for name, epochs in (("cifar10", 30), ("cifar10_tta", 18)):
        config = load(name)
        model = config["model"]["init_args"]
        assert config["trainer"]["max_epochs"] == epochs
        assert model["net"]["init_args"] == {"depth": 22, "width": 6, "num_classes": 10}
        assert model["optimizer"] == {"name": "adam", "wd_mode": "decoupled", "lr": 3e-3, "weight_decay": 0.1,
                                      "betas": [0.95, 0.99]}
        assert config["trainer"]["callbacks"][0]["init_args"]["schedule"]["init_args"] == {"div_factor": 10,
                                                                                           "pct": 0.075}
        assert config["data"]["init_args"]["batch_size"] == 128
        assert model["tta"] is (name == "cifar10_tta")
    cars = load("cars")
    assert cars["trainer"]["max_epochs"] == 60
    unfreeze = cars["trainer"]["callbacks"][1]["init_args"]
    assert unfreeze["unfreeze_at_epoch"] == 20
    assert unfreeze["lrs"] == pytest.approx([3e-3 / 9, 3e-3 / 3, 3e-3])
    optimizer = cars["model"]["init_args"]["optimizer"]
    assert (optimizer["lr"], optimizer["weight_decay"], optimizer["betas"]) == (1e-2, 1e-3, [0.95, 0.99])
    assert cars["trainer"]["callbacks"][0]["init_args"]["schedule"]["init_args"]["pct"] == 0.1
    assert cars["model"]["init_args"]["tta"] is True
    assert (cars["data"]["init_args"]["image_size"], cars["data"]["init_args"]["batch_size"]) == (224, 128)


@pytest.mark.parametrize("name", ["cifar10", "cifar10_tta", "quickstart"])
def test_cifar_configs_fast_dev_run_on_real_data(name: str, shared_data: Path, tmp_path: Path) -> None:
    cli = main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), *cifar_overrides(shared_data, tmp_path)])
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/acc", "lr", "momentum", "wd"} <= set(metrics)
    assert ("val/acc_tta" in metrics) == (name == "cifar10_tta")
    assert torch.isfinite(metrics["train/loss"])


def test_cifar_tta_config_tests_with_tta(shared_data: Path, tmp_path: Path) -> None:
    cli = main(["test", "--config", str(CONFIGS / "cifar10_tta.yaml"), *cifar_overrides(shared_data, tmp_path)])
    assert {"test/loss", "test/acc", "test/acc_tta"} <= set(cli.trainer.callback_metrics)


def test_quickstart_checkpoint_is_tested_with_tta_switched_on(shared_data: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # the documented flow: fit without TTA, then `test --model.init_args.tta true --ckpt_path last.ckpt`
    monkeypatch.chdir(tmp_path)  # the config logs and checkpoints under runs/
    data = ["--data.init_args.data_dir", str(shared_data / "cifar10"), "--data.init_args.train_subset", "64",
            "--data.init_args.eval_subset", "32", "--data.init_args.batch_size", "32",
            "--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_epochs", "1", *data])
    checkpoint = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    cli = main(["test", "--config", str(CONFIGS / "quickstart.yaml"), "--model.init_args.tta", "true",
                "--ckpt_path", str(checkpoint), *data])
    assert {"test/acc", "test/acc_tta"} <= set(cli.trainer.callback_metrics)


def test_cars_config_fast_dev_run_on_real_images(shared_data: Path, tmp_path: Path) -> None:
    cli = main(["fit", "--config", str(CONFIGS / "cars.yaml"), "--trainer.fast_dev_run", "1",
                *cars_overrides(shared_data, tmp_path)])
    assert {"train/loss", "val/acc", "val/acc_tta"} <= set(cli.trainer.callback_metrics)


def test_cars_recipe_unfreezes_into_a_second_cycle(shared_data: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # the cars config shortened to 2 epochs of 2 steps, unfreezing after the first; no logger, checkpoints or TTA
    config = load("cars")
    config["model"]["init_args"]["tta"] = False
    config["trainer"].update(max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False,
                             enable_checkpointing=False)
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:2]
    config["trainer"]["callbacks"][1]["init_args"]["unfreeze_at_epoch"] = 1
    path = tmp_path / "cars_short.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(path), *cars_overrides(shared_data, tmp_path)])
    model, trainer = cli.model, cli.trainer
    assert all(p.requires_grad for p in model.parameters())
    onecycle = next(cb for cb in trainer.callbacks if isinstance(cb, OneCycleWD))
    cycles = onecycle.state_dict()["cycles"][0]
    assert [c["start"] for c in cycles] == [0, 2]
    lrs = {g["layer_group"]: lr for g, lr in zip(trainer.optimizers[0].param_groups, cycles[1]["max_lrs"])}
    assert lrs == pytest.approx({0: 3e-3 / 9, 1: 3e-3 / 3, 2: 3e-3})


def readme_variants() -> list[list[str]]:
    """The variant commands of configs/README.md, as CLI arguments (after ``python -m lightning_adamw``)."""
    lines = (CONFIGS / "README.md").read_text().splitlines()
    commands = [shlex.split(line)[3:] for line in lines
                if line.startswith("python -m lightning_adamw fit --config configs/") and "optimizer" in line]
    return [[str(ROOT / arg) if arg.startswith("configs/") else arg for arg in command] for command in commands]


@pytest.mark.parametrize("command", readme_variants(), ids=lambda c: " ".join(c[3:])[:60])
def test_readme_variant_overrides_run(command: list[str], shared_data: Path, tmp_path: Path) -> None:
    config = load(Path(command[2]).stem)
    is_cars = "cars" in command[2]
    overrides = (["--trainer.fast_dev_run", "1", *cars_overrides(shared_data, tmp_path)] if is_cars
                 else cifar_overrides(shared_data, tmp_path))
    cli = main([*command, *overrides])
    expected = {**config["model"]["init_args"]["optimizer"]}
    for i, arg in enumerate(command):
        if arg == "--model.init_args.optimizer":
            expected.update(json.loads(command[i + 1]))
        elif arg.startswith("--model.init_args.optimizer."):
            expected[arg.rsplit(".", 1)[1]] = command[i + 1]
    chosen = cli.model.optimizer_config
    assert (chosen.name, chosen.wd_mode, chosen.weight_decay) == (expected["name"], expected["wd_mode"],
                                                                  expected["weight_decay"])
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD if chosen.name == "sgd" else torch.optim.Adam)
    group = optimizer.param_groups[-1]
    assert group.get("amsgrad", False) is (chosen.name == "amsgrad")
    l2 = chosen.wd_mode == "l2"
    assert (group["weight_decay"], group[DECOUPLED_WD_KEY]) == ((chosen.weight_decay, 0.0) if l2
                                                                        else (0.0, chosen.weight_decay))
