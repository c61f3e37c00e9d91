"""TensorBoard: every metric, lr / momentum / wd per parameter group and the run's hyperparameters, read back with
TensorBoard's own reader, at the same steps as the training loss."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from lightning_adamw.cli import main


def test_cli_run_logs_tags_steps_and_hparams(tmp_path: Path) -> None:
    main(["fit", "--model", "_tiny.TinyCLIModel", "--data", "_tiny.TinyData",
          "--model.optimizer.name", "adamw", "--model.optimizer.lr", "[1e-3, 3e-3]",
          "--model.optimizer.weight_decay", "0.1", "--trainer.callbacks", "OneCycleWD",
          "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.logger", "TensorBoardLogger", "--trainer.logger.save_dir", str(tmp_path),
          "--trainer.logger.name", "tb", "--trainer.logger.version", "run"])
    log_dir = tmp_path / "tb" / "run"
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "lr/pg0", "lr/pg1", "momentum/pg0", "momentum/pg1", "wd/pg0", "wd/pg1"} <= tags

    def steps(tag: str) -> list[int]:
        return [e.step for e in events.Scalars(tag)]

    assert steps("lr/pg0") == steps("train/loss") == steps("wd/pg1") == list(range(16))
    lr0, lr1 = ([e.value for e in events.Scalars(t)] for t in ("lr/pg0", "lr/pg1"))
    assert all(abs(b / a - 3.0) < 1e-5 for a, b in zip(lr0, lr1))  # discriminative lrs scale together
    assert steps("val/loss") == [7, 15]  # once per epoch, at the epoch's last step

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.init_args.optimizer.name"].string_value == "adamw"
    assert hparams["model.init_args.optimizer.weight_decay"].number_value == 0.1
    assert hparams["trainer.max_epochs"].number_value == 2
    assert (log_dir / "config.yaml").exists()
