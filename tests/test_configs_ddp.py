"""Every config runs under DDP: ``--trainer.devices 2 --trainer.strategy ddp_spawn`` on 2 CPU processes (gloo)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
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


def overrides(name: str, shared_data: Path, tmp_path: Path) -> list[str]:
    if name.startswith("wikitext2"):
        return shared_data_args(shared_data, tmp_path)
    if name == "cars":
        return cars_overrides(shared_data, tmp_path)
    return [*cifar_overrides(shared_data, tmp_path), "--data.init_args.eval_subset", "64"]


def test_every_config_is_covered() -> None:
    assert CONFIGS and all(n.startswith(("cifar10", "quickstart", "cars", "wikitext2")) for n in CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_under_ddp(name: str, shared_data: Path, tmp_path: Path) -> None:
    cli = main(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), *overrides(name, shared_data, tmp_path),
                *DDP])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert cli.trainer.world_size == 2
    assert math.isfinite(metrics["train/loss"])
    assert {"lr", "momentum"} <= {k.split("/")[0] for k in metrics}  # OneCycleWD ran (lr or lr/pg0, ...)
    assert any(k.startswith("val/") and math.isfinite(v) for k, v in metrics.items())
