"""Resuming through the CLI: ``--ckpt_path last`` continues the run for every config, a changed optimizer is refused,
``last.ckpt`` is the final state, a loader without state says how it resumes (issue 12, "Resume")."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_adamw.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ["--model", "_resume.ScoredModel", "--data", "_tiny.TinyData", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI gets its arguments through ``args``; pytest's own command line must not look like extra ones."""
    monkeypatch.setattr(sys, "argv", ["lightning_adamw"])


def trainer_section(config: Path, tmp_path: Path) -> Path:
    """The config's ``trainer`` section alone (its logger pointed into ``tmp_path``), for a tiny model and data."""
    trainer = yaml.safe_load(config.read_text())["trainer"]
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    trainer.update(default_root_dir=str(tmp_path / "root"), max_epochs=2, log_every_n_steps=1)
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump({"seed_everything": 0, "trainer": trainer}))
    return path


def message(caplog: pytest.LogCaptureFixture, pattern: str) -> str:
    """The first match of ``pattern`` in what Lightning's and the plugin's rank-zero messages said; clears them."""
    found = re.search(pattern, caplog.text)
    assert found, caplog.text[-3000:]
    caplog.clear()
    return found.group(0)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_continues_its_run_with_ckpt_path_last(config: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Each config's own logger and checkpoint callbacks: SIGTERM during step 5 (saved after the next step, 6, as
    SaveOnInterrupt's hook for step 5 ran before the signal), and the printed rerun continues there."""
    caplog.set_level("INFO")
    args = ["fit", "--config", str(trainer_section(config, tmp_path)), *TINY]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--trainer.callbacks+=_resume.SignalAt", "--trainer.callbacks.init_args.step", "5"])
    assert stopped.value.code == 0
    printed = message(caplog, r"Stopped by SIGTERM after step 6; saved (\S+)\. To continue, rerun the same command "
                              r"with --ckpt_path last \(or --ckpt_path (\S+)\); in Python .*ckpt_path='last'")
    saved = Path(re.search(r"saved (\S+)\.", printed).group(1))
    assert saved.is_file() and saved.name == "last.ckpt"

    cli = main([*args, "--ckpt_path", "last"])
    assert cli.trainer.global_step == 16  # continued from step 6, not restarted at 0 (that would also end at 16)
    assert message(caplog, r"Restored all states from the checkpoint at \S+") == \
        f"Restored all states from the checkpoint at {saved}"
    # the same log and checkpoint folder: one run in TensorBoard, its last.ckpt the end of the run
    assert Path(cli.trainer.log_dir) == saved.parent.parent
    assert torch.load(saved, weights_only=True)["global_step"] == 16
