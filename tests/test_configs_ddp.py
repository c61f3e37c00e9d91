"""Every config runs under DDP: ``--trainer.devices 2 --trainer.strategy ddp_spawn`` on 2 CPU processes (gloo)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import yaml
from test_lm_configs import shared_data_args
from test_vision_configs import cars_overrides, cifar_overrides

from lightning_adamw.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn",
       "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(autouse=True)
def _cli_argv(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """No pytest argv for the CLI; one intra-op thread per process (two processes share the two cores)."""
    monkeypatch.setattr(sys, "argv", ["lightning_adamw"])


def data_class(name: str) -> str:
    """The short class name of a config's datamodule."""
    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["data"]["class_path"].rsplit(".", 1)[-1]


def overrides(name: str, shared_data: Path, tmp_path: Path) -> list[str]:
    """Each datamodule's way to run on the shared data (tiny data and network), chosen by the config's data class."""
    kind = data_class(name)
    if kind == "WikiText2":
        return shared_data_args(shared_data, tmp_path)
    if kind == "StanfordCarsDataModule":
        return cars_overrides(shared_data, tmp_path)
    if kind == "CIFAR10DataModule":
        return [*cifar_overrides(shared_data, tmp_path, name), "--data.init_args.eval_subset", "64"]
    raise KeyError(f"configs/{name}.yaml uses {kind}: add its shared-data overrides to tests/test_configs_ddp.py")


def test_every_config_is_covered(shared_data: Path, tmp_path: Path) -> None:
    # every config's datamodule has overrides that point it at the shared data (a new datamodule fails here)
    for name in CONFIGS:
        args = overrides(name, shared_data, tmp_path)
        data_dir = next(a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args)
                        if a.startswith("--data.init_args.data_dir"))
        assert Path(data_dir).is_relative_to(shared_data) or Path(data_dir).is_relative_to(tmp_path), name


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_under_ddp(name: str, shared_data: Path, tmp_path: Path) -> None:
    cli = main(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), *overrides(name, shared_data, tmp_path),
                *DDP])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert cli.trainer.world_size == 2
    assert math.isfinite(metrics["train/loss"])
    assert {"lr", "momentum"} <= {k.split("/")[0] for k in metrics}  # OneCycleWD ran (lr or lr/pg0, ...)
    assert any(k.startswith("val/") and math.isfinite(v) for k, v in metrics.items())
