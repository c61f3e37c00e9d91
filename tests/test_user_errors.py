"""A user's mistake through the real CLI (a subprocess): one short message naming the problem, no traceback, exit != 0.

Covers bad config values, abbreviated or refused options, missing and broken data files, checkpoints that are
truncated, from another model or from another version, divergence without a configured guard, and runs that would
train no step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_adamw
from lightning_adamw._user_errors import TRACEBACK_ENV, VERSION_KEY

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, traceback: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != TRACEBACK_ENV}
    if traceback:
        env[TRACEBACK_ENV] = "1"
    return subprocess.run([sys.executable, "-m", "lightning_adamw", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr from the CLI's ``error:`` line on (what comes before is Lightning's start-up info)."""
    lines = result.stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error: ")), None)
    assert start is not None, result.stderr[-3000:]
    return lines[start:]


def assert_one_message(result: subprocess.CompletedProcess, *expected: str, code: int = 1) -> str:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) <= 2, "\n".join(lines)  # the message and the hint (how to see the traceback / the options)
    for text in expected:
        assert text in "\n".join(lines), "\n".join(lines)
    return lines[0]


def quickstart(shared_data: Path, tmp_path: Path, *extra: str, command: str = "fit") -> list[str]:
    """The quickstart config on 256 shared CIFAR-10 images, one epoch, writing into tmp_path."""
    return [command, "--config", "configs/quickstart.yaml", f"--data.init_args.data_dir={shared_data / 'cifar10'}",
            "--data.init_args.download=false", "--data.init_args.train_subset=256",
            "--data.init_args.eval_subset=64", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
            f"--trainer.logger.init_args.save_dir={tmp_path}", *extra]


# ---------------------------------------------------------------------------------------------- config values
def test_a_bad_value_is_one_line_and_the_traceback_is_there_on_request(shared_data: Path, tmp_path: Path) -> None:
    args = quickstart(shared_data, tmp_path, "--data.init_args.batch_size=0")
    assert_one_message(cli(*args), "batch_size must be >= 1, got 0.", TRACEBACK_ENV)
    debug = cli(*args, traceback=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "batch_size must be >= 1" in debug.stderr


def test_a_bad_choice_names_the_key_and_the_choices(shared_data: Path, tmp_path: Path) -> None:
    result = cli(*quickstart(shared_data, tmp_path, "--model.init_args.optimizer.wd_mode=foo"))
    assert_one_message(result, "model.optimizer.wd_mode: Expected a Literal['l2', 'decoupled'] (given: foo)", code=2)


def test_an_abbreviated_option_is_not_taken_for_the_full_name(shared_data: Path, tmp_path: Path) -> None:
    result = cli(*quickstart(shared_data, tmp_path, "--trainer.max_epoch", "2"))
    assert_one_message(result, "--trainer.max_epoch (did you mean --trainer.max_epochs?)", code=2)


def test_lr_scheduler_says_why_it_is_refused(shared_data: Path, tmp_path: Path) -> None:
    result = cli(*quickstart(shared_data, tmp_path, "--lr_scheduler", "torch.optim.lr_scheduler.StepLR"))
    assert_one_message(result, "--lr_scheduler is not available", "OneCycleWD", "refuses a second scheduler", code=2)


# ---------------------------------------------------------------------------------------------- data
def test_missing_cifar10_gives_its_message_without_a_traceback(tmp_path: Path) -> None:
    result = cli("fit", "--config", "configs/quickstart.yaml", f"--data.init_args.data_dir={tmp_path}",
                 "--data.init_args.download=false", "--trainer.logger=false")
    assert_one_message(result, f"CIFAR-10 was not found in {tmp_path / 'cifar-10-batches-py'}", "download=true")


def test_missing_wikitext2_file_gives_its_message(tmp_path: Path) -> None:
    result = cli("fit", "--config", "configs/wikitext2_small.yaml", f"--data.init_args.data_dir={tmp_path}",
                 "--data.init_args.download=false", "--trainer.logger=false")
    assert_one_message(result, f"WikiText-2 files missing in {tmp_path}: wiki.train.tokens")


def test_an_image_that_does_not_decode_in_a_worker_is_named(shared_data: Path, tmp_path: Path) -> None:
    from test_cars_data import N_TRAIN, devkit, image

    root = devkit(shared_data, tmp_path / "cars")
    bad = root / "cars_test" / f"{N_TRAIN + 1:05d}.jpg"
    bad.unlink()
    bad.write_bytes(image(shared_data, N_TRAIN + 1).read_bytes()[:500])
    result = cli("fit", "--config", "configs/cars.yaml", f"--data.init_args.data_dir={root}",
                 "--data.init_args.check_images=false", "--data.init_args.num_workers=1",
                 "--data.init_args.image_size=32", "--data.init_args.batch_size=4",
                 "--model.init_args.net.init_args.weights=null", "--model.init_args.tta=false",
                 "--trainer.max_steps=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                 "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}")
    assert_one_message(result, f"Could not read image {bad}", "Remove or replace the file")
    assert "DataLoader worker" not in result.stderr


def test_cars_download_prints_where_to_get_it(tmp_path: Path) -> None:
    result = cli("fit", "--config", "configs/cars.yaml", "--data.init_args.download=true", "--trainer.logger=false",
                 "--model.init_args.net.init_args.weights=null")
    assert_one_message(result, "Stanford Cars cannot be downloaded automatically", "stanford-cars-dataset")


# ---------------------------------------------------------------------------------------------- no training step
def test_a_subset_smaller_than_one_batch_with_drop_last_is_refused(shared_data: Path, tmp_path: Path) -> None:
    result = cli(*quickstart(shared_data, tmp_path, "--data.init_args.train_subset=100",
                             "--data.init_args.drop_last=true"))
    assert_one_message(result, "train_subset=100 gives 100 training images per device", "batch_size=128",
                       "drop_last=true", "no training step")


def test_fit_without_a_training_batch_is_an_error(shared_data: Path, tmp_path: Path) -> None:
    result = cli(*quickstart(shared_data, tmp_path, "--trainer.limit_train_batches=0"))
    assert_one_message(result, "fit trained no optimizer step: trainer.limit_train_batches=0", "validate")


# ---------------------------------------------------------------------------------------------- divergence
def test_no_config_saves_non_finite_weights_whatever_its_callbacks(shared_data: Path, tmp_path: Path) -> None:
    # the user's own callbacks list, without DivergenceGuard; an lr that turns the weights to NaN/inf in a few steps
    callbacks = ('[{"class_path": "lightning_adamw.OneCycleWD"}, {"class_path": '
                 '"lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": true}}]')
    result = cli(*quickstart(shared_data, tmp_path, f"--trainer.callbacks={callbacks}",
                             "--model.init_args.optimizer.lr=1e6", "--trainer.max_epochs=3"))
    assert_one_message(result, "NaN", "Try a lower maximum lr")
    for path in tmp_path.rglob("*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a two-step quickstart run."""
    out = tmp_path_factory.mktemp("run")
    result = cli(*quickstart(shared_data, out, "--trainer.max_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.rglob("last.ckpt")
    return path


def test_checkpoints_record_the_version(checkpoint: Path) -> None:
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)[VERSION_KEY] == lightning_adamw.__version__


def test_a_truncated_checkpoint_is_named(checkpoint: Path, shared_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(checkpoint.read_bytes()[:5000])
    result = cli(*quickstart(shared_data, tmp_path, f"--ckpt_path={bad}", command="validate"))
    assert_one_message(result, f"The checkpoint {bad} cannot be read: it is truncated or not a PyTorch checkpoint")


def test_a_checkpoint_of_another_model_is_named(checkpoint: Path, shared_data: Path, tmp_path: Path) -> None:
    result = cli(*quickstart(shared_data, tmp_path, "--model.init_args.net.init_args.width=2",
                             f"--ckpt_path={checkpoint}", command="validate"))
    assert_one_message(result, f"The checkpoint {checkpoint} cannot be restored into this run: its weights belong "
                       "to another model", "weights of another shape")


def test_a_checkpoint_of_another_version_is_named(checkpoint: Path, shared_data: Path, tmp_path: Path) -> None:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state[VERSION_KEY] = "0.0.1"
    del state["optimizer_states"][0]["param_groups"]  # a format this version does not read
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    result = cli(*quickstart(shared_data, tmp_path, "--trainer.max_steps=3", f"--ckpt_path={old}"))
    assert_one_message(result, f"The checkpoint {old} cannot be restored into this run",
                       f"written by lightning_adamw 0.0.1 and this is {lightning_adamw.__version__}")
