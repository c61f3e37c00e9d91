"""``python -m lightning_adamw``: every config prints, the CLI trains a model chosen by name, errors are clear."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_adamw.cli import import_zoo, main, zoo_names_without_zoo

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TESTS = Path(__file__).resolve().parent


def test_there_are_configs() -> None:
    assert CONFIGS, "configs/ holds no YAML file"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_prints(config: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "lightning_adamw", "fit", "--config", str(config), "--print_config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model:" in out.stdout and "trainer:" in out.stdout


def test_cli_fits_with_optimizer_and_schedule_by_name(tmp_path: Path) -> None:
    cli = main([
        "fit", "--model", "_tiny.TinyCLIModel", "--data", "_tiny.TinyData",
        "--model.optimizer.name", "adamw", "--model.optimizer.weight_decay", "0.1", "--model.optimizer.lr", "3e-3",
        "--trainer.callbacks", "OneCycleWD", "--trainer.callbacks.schedule", "OneCycle2018",
        "--trainer.callbacks.schedule.pct", "0.1", "--trainer.max_epochs", "2", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
    ])
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "OneCycleWD")
    assert type(callback.schedule).__name__ == "OneCycle2018" and callback.schedule.pct == 0.1
    assert cli.trainer.global_step == 16
    assert cli.model.optimizer_factory.resolved_wd_mode == "decoupled"


def test_unknown_optimizer_name_is_rejected_with_the_valid_names(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model", "_tiny.TinyCLIModel", "--data", "_tiny.TinyData",
              "--model.optimizer.name", "adamm", "--trainer.max_steps", "1"])
    err = capsys.readouterr().err
    assert "Unknown optimizer 'adamm'. Did you mean 'adam'?" in err and "sgdw" in err


def test_console_script_runs() -> None:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    out = subprocess.run(["lightning-adamw", "--help"], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and "fit" in out.stdout and "validate" in out.stdout


def test_import_zoo_finds_the_checkout_packages(tmp_path: Path) -> None:
    assert import_zoo(tmp_path) == []  # nothing outside a checkout
    imported = import_zoo(ROOT)
    assert all(name.split(".")[0] in ("models", "datamodules") for name in imported)


def test_short_zoo_names_outside_the_checkout_get_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "mixed.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: OneCycleWD\n    - class_path: ModelCheckpoint\n"
        "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
        "  logger: {class_path: TensorBoardLogger}\n"
        "model: {class_path: ImageClassifier, init_args: {net: {class_path: WideResNet}}}\n"
    )
    assert zoo_names_without_zoo(["fit", "--config", str(config)]) == [(str(config), "ImageClassifier"),
                                                                       (str(config), "WideResNet")]
    assert zoo_names_without_zoo(["fit", f"--config={config}"])[0][1] == "ImageClassifier"
    assert zoo_names_without_zoo(["fit", "--config", str(tmp_path / "missing.yaml")]) == []
    # a user's real situation: a zoo config run from another folder
    result = subprocess.run([sys.executable, "-m", "lightning_adamw", "fit", "--config",
                             str(ROOT / "configs" / "quickstart.yaml")], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode != 0
    assert "names `ImageClassifier`" in result.stderr and "root of the lightning_adamw checkout" in result.stderr


def test_lr_find_prints_a_suggestion_and_saves_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plot = tmp_path / "lr.png"
    main(["lr_find", "--model", "_tiny.TinyCLIModel", "--data", "_tiny.TinyData",
          "--model.optimizer.name", "adamw", "--model.optimizer.weight_decay", "0.1",
          "--trainer.callbacks", "OneCycleWD", "--trainer.max_epochs", "5", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
          "--num_training", "30", "--min_lr", "1e-5", "--max_lr", "1", "--plot_path", str(plot)])
    out = capsys.readouterr().out
    assert "lr_find: suggested lr" in out and str(plot) in out
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
