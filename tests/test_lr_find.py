"""The lr range test: Lightning's own Tuner with the plugin's optimizers, the debiased curve, fastai's rules, CLI."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny import TinyRegression, loader, trainer
from lightning.pytorch.tuner import Tuner
from torch import nn

from lightning_adamw import OneCycleWD, OptimizerConfig
from lightning_adamw.lr_find import SMOOTHING, debiased, lr_find, minimum, steep, valley

ROOT = Path(__file__).resolve().parents[1]
WD = 0.1


class Recording(TinyRegression):
    """Records the loss of each training step and, before it, an idle weight that only decay moves."""

    def __init__(self, config: OptimizerConfig) -> None:
        super().__init__(config)
        self.lr = config.lr  # the attribute Lightning's Tuner updates with its suggestion
        self.idle = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
        self.losses: list[float] = []
        self.idle_before: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.idle_before.append(self.idle[0, 0].item())
        loss = super().training_step(batch, batch_idx) + 0.0 * self.idle.sum()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return dataclasses.replace(self.optimizer_factory, lr=self.lr).build(self)


def test_lightnings_own_tuner_runs_with_decoupled_decay_at_the_finders_lr() -> None:
    """The user's call: a plain Trainer (OneCycleWD in its callbacks, which the finder swaps out) and Tuner.lr_find."""
    model = Recording(OptimizerConfig("adam", lr=1e-3, weight_decay=WD, wd_mode="decoupled"))
    before = [p.detach().clone() for p in model.parameters()]
    tr = trainer(max_epochs=5, callbacks=[OneCycleWD()])
    finder = Tuner(tr).lr_find(model, train_dataloaders=loader(), min_lr=1e-4, max_lr=1.0, num_training=20,
                               early_stop_threshold=None)
    lrs = finder.results["lr"]
    assert len(lrs) == 20 and len(model.idle_before) == 20
    for k in range(19):  # each step decayed once, by the lr the finder set for it
        assert model.idle_before[k + 1] == pytest.approx(model.idle_before[k] * (1 - lrs[k] * WD), rel=1e-12)
    for a, b in zip(before, model.parameters()):  # the finder puts the weights back
        assert torch.equal(a, b.detach())


def test_the_first_smoothed_point_is_the_first_loss_and_the_curve_is_fastais_smoothing() -> None:
    model = Recording(OptimizerConfig("adamw", lr=1e-3, weight_decay=WD))
    result = lr_find(trainer(max_epochs=5), model, datamodule=None, train_dataloaders=loader(), min_lr=1e-4,
                     max_lr=1.0, num_training=20, early_stop_threshold=None)
    assert result.losses[0] == pytest.approx(model.losses[0], rel=1e-12)
    avg, want = 0.0, []
    for n, loss in enumerate(model.losses, start=1):  # fastai's AvgSmoothLoss, the oracle
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        want.append(avg / (1 - SMOOTHING**n))
    assert result.losses == pytest.approx(want, rel=1e-10)
    assert result.raw_losses == pytest.approx(model.losses, rel=1e-9)
    assert set(result.suggestions) == {"steepest", "valley", "minimum/10", "steep"}


def test_debiasing_keeps_nan_points_out_of_the_average() -> None:
    losses = [2.0, 4.0, 3.0]
    lightning, avg = [], 0.0
    for step, loss in enumerate([2.0, None, 4.0, 3.0], start=1):  # _LRCallback's arithmetic, a step without loss
        if loss is None:
            lightning.append(math.nan)
            continue
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        lightning.append(avg / (1 - SMOOTHING ** (step + 1)))
    smoothed, raw = debiased(lightning)
    assert math.isnan(smoothed[1]) and math.isnan(raw[1])
    assert [raw[0], *raw[2:]] == pytest.approx(losses, rel=1e-12)
    assert smoothed[0] == pytest.approx(2.0)
    assert smoothed[2] == pytest.approx((0.98 * 0.02 * 2 + 0.02 * 4) / (1 - 0.98**2))


def fastai_valley(losses: list[float]) -> int:
    """fastai's ``valley`` loop as published (fastai/callback/schedule.py), on the already windowed losses."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


@pytest.mark.parametrize("seed", range(5))
def test_fastai_rules_match_their_published_definitions(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 60
    lrs = torch.logspace(-6, 0, n, dtype=torch.float64).tolist()
    shape = torch.linspace(-2, 2, n, dtype=torch.float64)
    losses = (shape**2 + 0.3 * torch.rand(n, generator=gen, dtype=torch.float64)).tolist()
    start, stop = n // 10, n - 5  # fastai's window: lrs[num_it//10:-5]
    window = losses[start:stop]
    assert valley(lrs, losses) == start + fastai_valley(window)
    assert minimum(lrs, losses) == start + min(range(len(window)), key=window.__getitem__)
    slopes = [(window[i + 1] - window[i]) / (math.log(lrs[start + i + 1]) - math.log(lrs[start + i]))
              for i in range(len(window) - 1)]
    assert steep(lrs, losses) == start + min(range(len(slopes)), key=slopes.__getitem__)


def test_rules_on_a_curve_that_never_falls() -> None:
    lrs = torch.logspace(-6, 0, 30).tolist()
    assert valley(lrs, [float(i) for i in range(30)]) is None


def test_cli_lr_find_on_the_quickstart_config(shared_data: Path, tmp_path: Path) -> None:
    plot = tmp_path / "lr_find.png"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_adamw", "lr_find", "--config", "configs/quickstart.yaml",
         "--data.init_args.data_dir", str(shared_data / "cifar10"), "--data.init_args.download", "false",
         "--data.init_args.train_subset", "512", "--data.init_args.batch_size", "16",
         "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path), "--num_training", "24", "--min_lr", "1e-5", "--max_lr", "1",
         "--plot_path", str(plot)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"lr_find: suggested lrs (24 steps; plot saved to {plot})" in out
    for name in ("steepest", "valley", "minimum/10", "steep"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert float(line.split()[1]) > 0, line
    assert plot.read_bytes()[:4] == b"\x89PNG" and plot.stat().st_size > 10_000
