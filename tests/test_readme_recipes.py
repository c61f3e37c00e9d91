"""The README's recipes for the three ways people wire Lightning (plain Python, LightningCLI YAML, Hydra) and its
fine-tuning recipe, run as written: the code blocks are read from README.md, so changing one changes what runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import _tiny
import hydra.utils
import lightning.pytorch as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from omegaconf import OmegaConf
from pytorch_lightning.cli import LightningCLI as PLLightningCLI
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_pytorch_lightning import onecycle_oracle
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import OneCycleWD, OptimizerConfig, backbone_layer_groups

README = Path(__file__).resolve().parents[1] / "README.md"
STEPS_PER_EPOCH = 8
# the CIFAR-10 recipe every wiring example uses: 30 epochs, max lr 3e-3, OneCycle2018(div_factor=10, pct=0.075)
CIFAR_LRS = onecycle_oracle(3e-3, 30 * STEPS_PER_EPOCH, 10, 0.075)


def recipe(name: str) -> str:
    """The code block after ``<!-- recipe: name -->`` in the README."""
    found = re.search(rf"<!-- recipe: {name} -->\n```\w+\n(.*?)```", README.read_text(), re.DOTALL)
    assert found, f"README.md has no block marked <!-- recipe: {name} -->"
    return found[1]


def logged(log_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


class TrainOnly(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return _tiny.loader(8)


def test_plain_python_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = recipe("python")
    placeholder = "    ...  # your network, training_step, validation_step\n"
    assert placeholder in code
    code = code.replace(placeholder, (
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.net = _tiny.make_net()\n"
        "    def training_step(self, batch, batch_idx):\n"
        "        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])\n"))
    monkeypatch.chdir(tmp_path)  # the Trainer's default logger and checkpoints go to ./lightning_logs
    namespace: dict[str, Any] = {"__name__": "readme", "_tiny": _tiny, "torch": torch, "datamodule": TrainOnly()}
    exec(code, namespace)
    assert namespace["trainer"].global_step == 30 * STEPS_PER_EPOCH
    lrs = logged(tmp_path / "lightning_logs" / "version_0", "lr")
    assert sorted(lrs) == list(range(9, 30 * STEPS_PER_EPOCH, 10))  # log_every_n_steps=10
    np.testing.assert_allclose([lrs[s] for s in sorted(lrs)], [CIFAR_LRS[s] for s in sorted(lrs)], rtol=1e-6)


@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_lightningcli_yaml_recipe(package: str, tmp_path: Path) -> None:
    config = yaml.safe_load(recipe("lightningcli"))
    if package == "pytorch_lightning":  # the README's rule for the standalone package
        import lightning_adamw.pytorch_lightning  # noqa: F401

        for callback in config["trainer"]["callbacks"]:
            callback["class_path"] = callback["class_path"].replace("lightning_adamw.",
                                                                    "lightning_adamw.pytorch_lightning.")
        config["model"]["class_path"], config["data"] = "_tiny_pl.TinyPLModel", {"class_path": "_tiny_pl.TinyPLData"}
        cli_class, root = PLLightningCLI, "pytorch_lightning"
    else:
        config["model"]["class_path"], config["data"] = "_tiny.TinyCLIModel", {"class_path": "_tiny.TinyData"}
        cli_class, root = LightningCLI, "lightning.pytorch"
    logger = {"class_path": f"{root}.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(tmp_path), "name": "tb", "version": "run"}}
    config["trainer"].update(logger=logger,
                             enable_progress_bar=False, default_root_dir=str(tmp_path))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = cli_class(args=["fit", "--config", str(path)])
    assert cli.trainer.global_step == 30 * STEPS_PER_EPOCH
    optimizer = cli.model.optimizer_factory if package == "lightning" else cli.model.optimizer_config
    assert optimizer.name == "adamw" and optimizer.betas == (0.95, 0.99)
    lrs = logged(tmp_path / "tb" / "run", "lr/pg0")
    assert sorted(lrs) == list(range(9, 30 * STEPS_PER_EPOCH, 10))
    np.testing.assert_allclose([lrs[s] for s in sorted(lrs)], [CIFAR_LRS[s] for s in sorted(lrs)], rtol=1e-6)


def test_hydra_recipe() -> None:
    cfg = OmegaConf.create(recipe("hydra"))
    optimizer = hydra.utils.instantiate(cfg.model.optimizer)
    assert isinstance(optimizer, OptimizerConfig) and optimizer.betas == (0.95, 0.99)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    assert [type(c).__name__ for c in callbacks] == ["OneCycleWD", "DivergenceGuard"]
    recorder = _tiny.Recorder()
    trainer = _tiny.trainer(max_epochs=30, callbacks=[*callbacks, recorder])
    trainer.fit(_tiny.TinyRegression(optimizer), _tiny.loader(8))
    np.testing.assert_allclose([lrs[0] for lrs in recorder.lrs], CIFAR_LRS, rtol=1e-9)
    assert recorder.momenta[0][0] == 0.95  # beta1 cycled from the schedule, beta2 0.99 from the config
    assert isinstance(callbacks[0], OneCycleWD)


def test_fine_tune_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(recipe("finetune"), namespace)
    model = namespace["CarsModel"](weights=None)  # offline: no ImageNet download in the tests
    params = [[id(p) for p in g.parameters()] for g in model.layer_groups()]
    assert params == [[id(p) for p in g.parameters()] for g in backbone_layer_groups(model.net)]  # "also the default"

    trainer = namespace["trainer"]
    recorder = _tiny.Recorder()
    trainer.callbacks.append(recorder)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 196, (2,), generator=gen))
    trainer.fit(model, DataLoader(data, batch_size=2))  # one step per epoch: 20 head steps, then 40 unfrozen
    head = onecycle_oracle(1e-2, 20, 10, 0.1)
    unfrozen = onecycle_oracle(1.0, 40, 10, 0.1)
    expected = [[lr] * 3 for lr in head] + [[3e-3 / 9 * m, 3e-3 / 3 * m, 3e-3 * m] for m in unfrozen]
    np.testing.assert_allclose(recorder.lrs, expected, rtol=1e-9)
