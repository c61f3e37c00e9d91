"""A run stopped mid-cycle and resumed follows the same lr / momentum / wd curve and ends with the same weights."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from _tiny import Recorder, TinyRegression, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_adamw import OneCycle2018, OneCycleWD, OptimizerConfig

CONFIG = OptimizerConfig("adamw", lr=5e-3, betas=(0.95, 0.99), weight_decay=0.1)
# every optimizer whose decay OneCycleWD owns resumes exactly: Muon's momentum buffers sit beside AdamW's moments
CONFIGS = {"adamw": CONFIG, "muon": OptimizerConfig("muon", lr=5e-3, betas=(0.95, 0.99), weight_decay=0.1),
           "lion": OptimizerConfig("lion", lr=1e-3, betas=(0.95, 0.99), weight_decay=0.3)}


def logged(logger: CSVLogger, key: str) -> dict[int, float]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def run(tmp_path: Path, name: str, epochs: int, ckpt_path: str | None = None, seed: int = 0,
        config: OptimizerConfig = CONFIG):
    recorder, logger = Recorder(), CSVLogger(tmp_path, name=name)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / name / "ckpt", save_top_k=-1, every_n_epochs=1)
    model = TinyRegression(config, seed=seed)
    tr = trainer(max_epochs=epochs, logger=logger, log_every_n_steps=1, enable_checkpointing=True,
                 callbacks=[OneCycleWD(OneCycle2018(pct=0.2)), recorder, checkpoints])
    tr.fit(model, loader(), ckpt_path=ckpt_path)
    return model, recorder, logger


@pytest.mark.parametrize("optimizer", sorted(CONFIGS))
def test_resume_mid_cycle_follows_the_same_curve(tmp_path: Path, optimizer: str) -> None:
    config = CONFIGS[optimizer]
    full, full_rec, full_log = run(tmp_path, "full", epochs=6, config=config)
    ckpt = tmp_path / "full" / "ckpt" / "epoch=2-step=24.ckpt"
    # a different initialisation proves the weights come from the checkpoint
    resumed, rec, log = run(tmp_path, "resumed", epochs=6, ckpt_path=str(ckpt), seed=123, config=config)
    assert rec.steps == list(range(24, 48))
    assert rec.lrs == full_rec.lrs[24:]
    assert rec.momenta == full_rec.momenta[24:]
    full_wd, resumed_wd = logged(full_log, "wd"), logged(log, "wd")
    assert resumed_wd == {s: v for s, v in full_wd.items() if s >= 24}
    for a, b in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_with_a_changed_run_length_says_so(tmp_path: Path) -> None:
    run(tmp_path, "full", epochs=4)
    ckpt = tmp_path / "full" / "ckpt" / "epoch=1-step=16.ckpt"
    with pytest.raises(MisconfigurationException, match="checkpointed with a 32-step OneCycleWD cycle but now has 48"):
        run(tmp_path, "longer", epochs=6, ckpt_path=str(ckpt))
