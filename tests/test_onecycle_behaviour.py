"""OneCycleWD in a Trainer: decay once per optimizer step, logging, mixed precision, refusals."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _tiny import Recorder, TinyRegression, loader, regression_data, trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import Constant, OneCycle, OneCycleWD, OptimizerConfig


class WithIdle(TinyRegression):
    """Adds parameters whose gradient is exactly zero: Adam leaves them alone, so only decay moves them."""

    def __init__(self, config: OptimizerConfig) -> None:
        super().__init__(config)
        self.idle_weight = nn.Parameter(torch.ones(3, 3, dtype=torch.float64))
        self.idle_scale = nn.Parameter(torch.ones(3, dtype=torch.float64))  # 1-d: excluded from decay

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + 0.0 * (self.idle_weight.sum() + self.idle_scale.sum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory.build(self)


@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_decay_exactly_once_per_optimizer_step(accumulate: int) -> None:
    lr, wd = 0.05, 0.1
    model = WithIdle(OptimizerConfig("adamw", lr=lr, weight_decay=wd, exclude_bias_and_norm=True))
    schedule = OneCycle()
    tr = trainer(max_epochs=3, accumulate_grad_batches=accumulate, callbacks=[OneCycleWD(schedule)])
    tr.fit(model, loader())
    total = 3 * math.ceil(8 / accumulate)
    assert tr.global_step == total
    expected = math.prod(1 - lr * schedule(t, total)[0] * wd for t in range(total))
    torch.testing.assert_close(model.idle_weight.detach(), torch.full((3, 3), expected, dtype=torch.float64),
                               rtol=1e-13, atol=0)
    assert torch.equal(model.idle_scale.detach(), torch.ones(3, dtype=torch.float64))  # excluded: untouched


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_logged_values_are_the_values_used(tmp_path: Path) -> None:
    lr, wd = 0.02, 0.1
    recorder = Recorder()
    logger = CSVLogger(tmp_path, name="run")
    tr = trainer(max_epochs=2, logger=logger, log_every_n_steps=1,
                 callbacks=[OneCycleWD(OneCycle(pct_start=0.4)), recorder])
    tr.fit(TinyRegression(OptimizerConfig("adamw", lr=lr, weight_decay=wd)), loader())
    rows = read_csv(Path(logger.log_dir) / "metrics.csv")
    logged = [r for r in rows if r.get("lr")]
    assert len(logged) == 16 == len(recorder.lrs)
    # Lightning stores logged scalars in float32
    assert [float(r["lr"]) for r in logged] == pytest.approx([x[0] for x in recorder.lrs], rel=1e-6)
    assert [float(r["momentum"]) for r in logged] == pytest.approx([m[0] for m in recorder.momenta], rel=1e-6)
    assert [float(r["wd"]) for r in logged] == pytest.approx([x[0] * wd for x in recorder.lrs], rel=1e-6)
    # the same step index as the training loss of that batch
    loss_steps = [r["step"] for r in rows if r.get("train/loss")]
    assert [r["step"] for r in logged] == loss_steps == [str(s) for s in range(16)]


def test_group_names_when_several_groups(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run")

    class TwoGroups(TinyRegression):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.optimizer_factory.build(self.layer_groups())

    tr = trainer(max_steps=3, logger=logger, log_every_n_steps=1, callbacks=[OneCycleWD()])
    tr.fit(TwoGroups(OptimizerConfig("adamw", lr=[1e-3, 1e-2], weight_decay=0.1)), loader())
    header = read_csv(Path(logger.log_dir) / "metrics.csv")[0].keys()
    assert {"lr/pg0", "lr/pg1", "momentum/pg0", "wd/pg0", "wd/pg1"} <= set(header)


def test_no_decay_on_a_step_that_fp16_skips(tmp_path: Path) -> None:
    class InfAtStep3(TinyRegression):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if self.global_step == 3 else loss

    snapshots: dict[int, list[torch.Tensor]] = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            snapshots[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    model = InfAtStep3(OptimizerConfig("adamw", lr=1e-2, weight_decay=0.1))
    model.net.float()
    x, y = regression_data().tensors
    data = DataLoader(TensorDataset(x.float(), y.float()), batch_size=8)
    logger = CSVLogger(tmp_path, name="run")
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    tr = trainer(max_epochs=1, logger=logger, log_every_n_steps=1,
                 plugins=[MixedPrecision("16-mixed", "cpu", scaler)], callbacks=[OneCycleWD(), Snapshot()])
    tr.fit(model, data)

    def moved(step: int) -> bool:
        return any(not torch.equal(a, b) for a, b in zip(snapshots[step], snapshots[step + 1]))

    assert [moved(s) for s in range(6)] == [True, True, True, False, True, True]
    wd = [float(r["wd"]) for r in read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("wd")]
    assert wd[3] == 0.0 and all(v > 0 for i, v in enumerate(wd) if i != 3)


def test_refuses_a_second_lr_scheduler() -> None:
    class WithScheduler(TinyRegression):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]

    with pytest.raises(MisconfigurationException, match="StepLR.*two owners of the lr"):
        trainer(max_steps=2, callbacks=[OneCycleWD()]).fit(WithScheduler(), loader())


def test_refuses_decay_twice() -> None:
    model = TinyRegression(lambda params: torch.optim.AdamW(params, lr=1e-3))  # AdamW defaults to wd 0.01
    with pytest.raises(MisconfigurationException, match="weight_decay=0.01.*decay must happen once"):
        trainer(max_steps=2, callbacks=[OneCycleWD(weight_decay=0.1)]).fit(model, loader())


def test_schedule_only_keeps_the_optimizers_own_decay() -> None:
    """Without a decoupled weight decay the callback only schedules: torch's AdamW decays as usual."""
    recorder = Recorder()
    model = TinyRegression(lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.5))
    trainer(max_steps=4, callbacks=[OneCycleWD(), recorder]).fit(model, loader())
    assert len(recorder.lrs) == 4
    # oracle: a naive loop with torch's AdamW (its own decay 0.5) at the lrs and beta1s OneCycleWD set
    reference = TinyRegression()
    optimizer = torch.optim.AdamW(reference.net.parameters(), lr=1e-3, weight_decay=0.5)
    for (x, y), lrs, momenta in zip(loader(), recorder.lrs, recorder.momenta):
        for group in optimizer.param_groups:
            group["lr"], group["betas"] = lrs[0], (momenta[0], group["betas"][1])
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(reference.net(x), y).backward()
        optimizer.step()
    for a, b in zip(model.net.parameters(), reference.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    undecayed = TinyRegression(lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0))
    trainer(max_steps=4, callbacks=[OneCycleWD()]).fit(undecayed, loader())
    assert not torch.allclose(undecayed.net[0].weight, model.net[0].weight)  # the decay did act


def test_needs_a_run_length() -> None:
    with pytest.raises(MisconfigurationException, match="needs the run length"):
        trainer(max_epochs=-1, max_steps=-1, max_time="00:00:00:05",
                callbacks=[OneCycleWD()]).fit(TinyRegression(), loader())


def test_explicit_total_steps_and_max_lr() -> None:
    recorder = Recorder()
    callback = OneCycleWD(Constant(), max_lr=0.5, total_steps=100)
    trainer(max_steps=3, callbacks=[callback, recorder]).fit(TinyRegression(OptimizerConfig("sgd", lr=1e-3)), loader())
    assert recorder.lrs == [[0.5]] * 3
    assert callback.values(50)[0] == [0.5]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_lr=-1.0), "max_lr must be positive"),
        (dict(total_steps=0), "total_steps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(wd_convention="paper"), "wd_convention"),
        (dict(schedule="onecycle"), "lightning_adamw.Schedule"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        OneCycleWD(**kwargs)


def test_optimizer_without_momentum_warns_and_schedules_lr() -> None:
    recorder = Recorder()
    model = TinyRegression(lambda params: torch.optim.Adagrad(params, lr=0.1))
    with pytest.warns(UserWarning, match="neither `momentum` nor `betas`"):
        trainer(max_steps=4, callbacks=[OneCycleWD(), recorder]).fit(model, loader())
    assert recorder.lrs[0][0] == pytest.approx(0.1 / 25)
