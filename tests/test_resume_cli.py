"""Resuming through the CLI: ``--ckpt_path last`` continues the run for every config, a changed optimizer is refused,
``last.ckpt`` is the final state, a loader without state says how it resumes (issue 12, "Resume")."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_adamw.cli import import_zoo, main

ROOT = Path(__file__).resolve().parents[1]
import_zoo(ROOT)  # the zoo runs from the checkout: put it on sys.path
TESTS = ROOT / "tests"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ["--model", "_resume.ScoredModel", "--data", "_tiny.TinyData", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI gets its arguments through ``args``; pytest's own command line must not look like extra ones."""
    monkeypatch.setattr(sys, "argv", ["lightning_adamw"])


def trainer_section(config: Path, tmp_path: Path, max_epochs: int = 2, **callback_args: dict[str, Any]) -> Path:
    """The config's ``trainer`` section alone (its logger pointed into ``tmp_path``), for a tiny model and data;
    ``callback_args`` (by short class name) update init_args of the config's callbacks."""
    trainer = yaml.safe_load(config.read_text())["trainer"]
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    for callback in trainer["callbacks"]:
        callback.setdefault("init_args", {}).update(callback_args.get(callback["class_path"].rsplit(".", 1)[-1], {}))
    trainer.update(default_root_dir=str(tmp_path / "root"), max_epochs=max_epochs, log_every_n_steps=1)
    tmp_path.mkdir(parents=True, exist_ok=True)
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


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a TensorBoard run folder (all its event files) as ``tag -> {step: value}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_quickstart_interrupted_mid_epoch_resumes_as_the_uninterrupted_run(shared_data: Path, tmp_path: Path) -> None:
    """configs/quickstart.yaml (fast CIFAR-10 loader, 600 images in 10 batches of 64, the last one short, 2 epochs),
    SIGTERM from outside mid-way through epoch 2, the printed command rerun: the same weights and the same lr,
    momentum, wd and loss at every step as a run that was never stopped."""
    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "lightning_adamw", "fit", "--config", "configs/quickstart.yaml",
                "--data.init_args.data_dir", str(shared_data / "cifar10"), "--data.init_args.download", "false",
                "--data.init_args.train_subset", "600", "--data.init_args.eval_subset", "256",
                "--data.init_args.batch_size", "64", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
                "--trainer.logger.init_args.save_dir", str(tmp_path / name), "--trainer.enable_progress_bar", "false",
                "--trainer.callbacks+=_resume.Announce", "--trainer.callbacks.init_args.slow_from", "12"]

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]), OMP_NUM_THREADS="1")
    full = subprocess.run(command("full"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    child = subprocess.Popen(command("cut"), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    for line in child.stdout:
        if line.strip() == "STEP 13":
            child.send_signal(signal.SIGTERM)
            break
    _, err = child.communicate(timeout=600)
    assert child.returncode == 0, err[-3000:]
    told = re.search(r"Stopped by SIGTERM after step (\d+); saved (\S+)\. To continue, rerun the same command with "
                     r"(--ckpt_path \S+)", err)
    assert told, err[-3000:]
    stopped_at, saved = int(told.group(1)), Path(told.group(2))
    assert 10 < stopped_at < 20  # mid-way through the second epoch (steps 10-19)
    resumed = subprocess.run(command("cut") + told.group(3).split(), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {saved.resolve()}" in resumed.stderr

    run = tmp_path / "cut" / "quickstart"
    assert sorted(p.name for p in run.iterdir()) == ["version_0"]  # the rerun continued the run's own folder
    final = {name: torch.load(tmp_path / name / "quickstart" / "version_0" / "checkpoints" / "last.ckpt",
                              weights_only=True) for name in ("full", "cut")}
    assert final["full"]["global_step"] == final["cut"]["global_step"] == 20
    for key, value in final["full"]["state_dict"].items():
        torch.testing.assert_close(final["cut"]["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    logged = {name: scalars(tmp_path / name / "quickstart" / "version_0") for name in ("full", "cut")}
    for tag in ("lr", "momentum", "wd", "train/loss"):
        steps = logged["full"][tag]
        assert len(steps) >= 19 and logged["cut"][tag].keys() == steps.keys(), tag
        for step, value in steps.items():
            assert logged["cut"][tag][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)


def interrupted_run(config: str, tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    """``fit`` of the config's trainer section on the tiny model, stopped by SIGTERM during step 5; its arguments
    and the saved checkpoint."""
    args = ["fit", "--config", str(trainer_section(ROOT / "configs" / f"{config}.yaml", tmp_path)), *TINY, *extra]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--trainer.callbacks+=_resume.SignalAt", "--trainer.callbacks.init_args.step", "5"])
    assert stopped.value.code == 0
    saved = next((tmp_path / "runs").glob("*/version_0/checkpoints/last.ckpt"))
    return args, saved


@pytest.mark.parametrize("given", ["path", "last"])
def test_resuming_with_another_optimizer_is_refused_naming_both(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 given: str) -> None:
    args, saved = interrupted_run("quickstart", tmp_path, "--model.optimizer.name", "adam",
                                  "--model.optimizer.lr", "3e-3")
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main([*args, "--model.optimizer.name", "sgd", "--model.optimizer.lr", "0.1",
              "--ckpt_path", str(saved) if given == "path" else "last"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert (f"--ckpt_path {saved} was trained with another optimizer than this command's model.init_args.optimizer "
            "(lr: 0.003 -> 0.1; name: 'adam' -> 'sgd')") in err
    assert "Traceback" not in err and err.count("\n") < 10
    assert torch.load(saved, weights_only=True)["global_step"] == 6  # nothing trained on


def test_last_ckpt_is_the_final_state_when_the_metric_fell_at_the_end(tmp_path: Path) -> None:
    """The quickstart's checkpointing (monitor val/acc, mode max, save_last): val/acc 0.5, 0.9, then 0.4."""
    cli = main(["fit", "--config", str(trainer_section(ROOT / "configs" / "quickstart.yaml", tmp_path)), *TINY,
                "--model.scores", "[0.5, 0.9, 0.4]", "--trainer.max_epochs", "3"])
    callback = cli.trainer.checkpoint_callback
    assert Path(callback.best_model_path).name == "epoch=1-step=16.ckpt"  # the best is kept as it was
    last = torch.load(callback.last_model_path, weights_only=True)
    assert Path(callback.last_model_path).name == "last.ckpt" and last["global_step"] == 24
    for key, value in cli.model.state_dict().items():
        torch.testing.assert_close(last["state_dict"][key], value, rtol=0, atol=0, msg=key)


def test_a_loader_without_state_says_how_the_epoch_resumes(tmp_path: Path) -> None:
    """The tiny data's plain DataLoader (as the Cars, torchvision CIFAR-10 and WikiText-2 training loaders: no
    state_dict), resumed mid-epoch: one line says what happens instead of an exact resume."""
    from torch.utils.data import DataLoader

    from datamodules.wikitext2 import TrainWindows

    assert not hasattr(DataLoader, "load_state_dict") and not hasattr(TrainWindows, "load_state_dict")
    args, saved = interrupted_run("cars", tmp_path)
    with pytest.warns(UserWarning) as caught:
        main([*args, "--ckpt_path", "last"])
    said = [str(w.message) for w in caught if "resum" in str(w.message).lower()]
    assert said == ["Resuming mid-epoch (epoch 0, step 6) with a training loader without "
                    "state_dict()/load_state_dict() (DataLoader): the rest of this epoch restarts from the first "
                    "batch of a new pass over the data, so some of its batches are seen twice and others not at "
                    "all; a loader with that state resumes exactly."]


def test_cars_callbacks_resumed_after_the_unfreeze_keep_training_the_whole_network(tmp_path: Path) -> None:
    """configs/cars.yaml's OneCycleWD + FreezeUnfreeze (unfreeze after epoch 1 of 3 here) on a three-group model
    with a resumable loader, SIGTERM mid-way through the first unfrozen epoch and the printed rerun: the body stays
    unfrozen (its BatchNorm training), the groups keep the unfrozen discriminative lrs of the fresh cycle, and the
    run ends with the weights of a run never stopped (Lightning's BaseFinetuning re-freezes a resumed body first,
    Lightning issue #21901)."""
    def args(name: str) -> list[str]:
        config = trainer_section(ROOT / "configs" / "cars.yaml", tmp_path / name, max_epochs=3,
                                 FreezeUnfreeze={"unfreeze_at_epoch": 1})
        return ["fit", "--config", str(config), *TINY, "--model", "_resume.ThreeGroupModel",
                "--data", "_tiny.TinyResumableData", "--trainer.callbacks+=_resume.Trainable"]

    full = main(args("full"))
    with pytest.raises(SystemExit):
        main([*args("cut"), "--trainer.callbacks+=_resume.SignalAt", "--trainer.callbacks.init_args.step", "11"])
    resumed = main([*args("cut"), "--ckpt_path", "last"])

    seen = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "Trainable").seen
    assert sorted(seen) == list(range(12, 24))  # resumed after step 12, mid-way through epoch 1 (steps 8-15)
    assert all(trainable and bn_training for trainable, bn_training in seen.values()), seen
    logged = {name: scalars(Path(cli.trainer.log_dir)) for name, cli in (("full", full), ("cut", resumed))}
    lrs = [{step: lr for step, lr in logged["cut"][f"lr/pg{i}"].items() if step >= 12} for i in range(3)]
    for step in range(12, 24):  # the Cars recipe's [3e-3/9, 3e-3/3, 3e-3], scaled by one multiplier
        assert [lr[step] / lrs[2][step] for lr in lrs] == pytest.approx([1 / 9, 1 / 3, 1], rel=1e-5)
        assert [lr[step] for lr in lrs] == [logged["full"][f"lr/pg{i}"][step] for i in range(3)]
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
