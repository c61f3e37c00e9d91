"""A small training run driven by tests/test_interrupt.py in a subprocess: full, interruptible, or resumed."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _tiny import Recorder, ResumableLoader, TinyRegression, regression_data, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_adamw import OneCycle2018, OneCycleWD, OptimizerConfig, SaveOnInterrupt


class Announce(pl.Callback):
    """Prints each finished step for the parent process and slows down so that a signal lands mid-run."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        print(f"STEP {trainer.global_step}", flush=True)
        if trainer.global_step >= 4:
            time.sleep(0.2)


def main(out: Path, mode: str, accumulate: int) -> None:
    torch.use_deterministic_algorithms(True)
    recorder = Recorder()
    callbacks = [OneCycleWD(OneCycle2018(pct=0.2)), SaveOnInterrupt(), recorder,
                 ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_epochs=1)]
    if mode == "run":
        callbacks.append(Announce())
    model = TinyRegression(OptimizerConfig("adamw", lr=5e-3, betas=(0.95, 0.99), weight_decay=0.1),
                           seed=0 if mode != "resume" else 99)
    tr = trainer(max_epochs=3, accumulate_grad_batches=accumulate, enable_checkpointing=True, callbacks=callbacks)
    tr.fit(model, ResumableLoader(regression_data(), batch_size=8), ckpt_path="last" if mode == "resume" else None)
    torch.save({"state_dict": model.state_dict(), "steps": recorder.steps, "lrs": recorder.lrs,
                "momenta": recorder.momenta}, out / f"{mode}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
