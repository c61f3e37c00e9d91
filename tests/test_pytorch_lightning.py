"""The callbacks in a ``pytorch_lightning`` Trainer (the standalone package): from Python and from its LightningCLI's
YAML, following the 1cycle schedule (torch's OneCycleLR as the oracle) and training exactly as under
``lightning.pytorch``."""

from __future__ import annotations

import csv
import inspect
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import _tiny
import lightning.pytorch as L
import pytorch_lightning as pl
import torch
from _tiny_pl import TinyPLModel

import lightning_adamw
import lightning_adamw.pytorch_lightning as lap
from lightning_adamw.cli import main

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
STEPS_PER_EPOCH = 8


def onecycle_oracle(max_lr: float, total: int, div: float, pct: float) -> list[float]:
    """torch's OneCycleLR in the 2018 shape (RECIPES.md), the lr of each of ``total`` steps."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, div_factor=div,
                                                final_div_factor=100, pct_start=(1 - pct) / 2,
                                                anneal_strategy="linear", three_phase=True, cycle_momentum=False)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


class PLRecorder(pl.Callback):
    """Every group's lr as the optimizer steps with it (a step post-hook)."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        trainer.optimizers[0].register_step_post_hook(
            lambda opt, args, kwargs: self.lrs.append([g["lr"] for g in opt.param_groups]))


def test_port_classes_are_the_plugin_callbacks_on_pytorch_lightning_bases() -> None:
    for name in ("OneCycleWD", "FreezeUnfreeze", "DecoupledDecay", "DivergenceGuard", "SaveOnInterrupt",
                 "ScheduleFreeEval"):
        port, original = getattr(lap, name), getattr(lightning_adamw, name)
        assert issubclass(port, pl.Callback) and not issubclass(port, L.Callback), name
        assert inspect.getsource(port) == inspect.getsource(original)  # one source file
    assert issubclass(lap.FreezeUnfreeze, pl.callbacks.BaseFinetuning)
    assert lap.finetuning.OneCycleWD is lap.OneCycleWD  # FreezeUnfreeze finds the ported OneCycleWD
    assert lap.OneCycle2018 is lightning_adamw.OneCycle2018 and lap.OptimizerConfig is lightning_adamw.OptimizerConfig
    for module in (getattr(lap, name) for name in lap.PORTED_MODULES):  # nothing of lightning.* left in the copies
        used = {getattr(v, "__module__", "") or "" for v in vars(module).values()}
        used |= {v.__name__ for v in vars(module).values() if isinstance(v, types.ModuleType)}
        assert not [m for m in used if m.split(".")[0] == "lightning"], module.__name__


def test_lightning_cli_short_names_still_resolve_with_the_port_imported(tmp_path: Path) -> None:
    cli = main(["fit", "--model", "_tiny.TinyCLIModel", "--data", "_tiny.TinyData", "--trainer.callbacks",
                "OneCycleWD", "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar",
                "false", "--trainer.default_root_dir", str(tmp_path)])
    # the CLI adds a DivergenceGuard beside the given callbacks
    assert [type(c) for c in cli.trainer.callbacks if type(c).__name__ == "OneCycleWD"] == [lightning_adamw.OneCycleWD]


def _fit(package: Any, model: Any, callbacks: list[Any], epochs: int) -> None:
    trainer = package.Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=_tiny.loader(8))


def test_pytorch_lightning_trainer_runs_the_fine_tune_and_matches_lightning() -> None:
    # Python route: 1 epoch head only at 1e-2, then a fresh cycle at [1e-3, 3e-3]; decoupled decay 0.1
    def callbacks(port: Any) -> list[Any]:
        return [port.OneCycleWD(lightning_adamw.OneCycle2018(div_factor=10, pct=0.1)),
                port.FreezeUnfreeze(unfreeze_at_epoch=1, lrs=[1e-3, 3e-3]), port.DivergenceGuard(),
                port.SaveOnInterrupt()]

    config = lightning_adamw.OptimizerConfig("adamw", lr=1e-2, weight_decay=0.1, betas=(0.95, 0.99))
    recorder = PLRecorder()
    model = TinyPLModel(config)
    _fit(pl, model, [*callbacks(lap), recorder], epochs=3)

    first = onecycle_oracle(1e-2, STEPS_PER_EPOCH, 10, 0.1)
    second = onecycle_oracle(1.0, 2 * STEPS_PER_EPOCH, 10, 0.1)
    expected = [[lr, lr] for lr in first] + [[1e-3 * m, 3e-3 * m] for m in second]
    assert len(recorder.lrs) == 3 * STEPS_PER_EPOCH
    torch.testing.assert_close(torch.tensor(recorder.lrs), torch.tensor(expected), rtol=1e-9, atol=0)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen by the ported BaseFinetuning

    # the same run under lightning.pytorch with the plugin's own callbacks ends at the same weights
    class LightningTwin(_tiny.TinyRegression):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return config.build(self.layer_groups())

    twin = LightningTwin()
    _fit(L, twin, callbacks(lightning_adamw), epochs=3)
    for a, b in zip(model.net.parameters(), twin.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


CONFIG = """\
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_checkpointing: false
  logger:
    class_path: pytorch_lightning.loggers.CSVLogger
    init_args: {{save_dir: {out}, name: run, version: 0}}
  callbacks:
    - class_path: {callback}
      init_args:
        schedule:
          class_path: lightning_adamw.OneCycle2018
          init_args: {{div_factor: 10, pct: 0.1}}
model:
  class_path: _tiny_pl.TinyPLModel
  init_args:
    optimizer: {{name: AdamW, lr: 3.0e-3, weight_decay: 0.1}}
data:
  class_path: _tiny_pl.TinyPLData
"""


def _cli(tmp_path: Path, callback: str, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(out=tmp_path, callback=callback))
    script = "from pytorch_lightning.cli import LightningCLI; LightningCLI(subclass_mode_model=True, " \
             "subclass_mode_data=True)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", script, "fit", "--config", str(config), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_pytorch_lightning_cli_yaml_runs_the_schedule(tmp_path: Path) -> None:
    out = _cli(tmp_path, "lightning_adamw.pytorch_lightning.OneCycleWD")
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        logged = [(int(r["step"]), float(r["lr/pg1"])) for r in csv.DictReader(f) if r.get("lr/pg1")]
    expected = onecycle_oracle(3e-3, 2 * STEPS_PER_EPOCH, 10, 0.1)
    assert [s for s, _ in logged] == list(range(2 * STEPS_PER_EPOCH))
    torch.testing.assert_close(torch.tensor([lr for _, lr in logged]), torch.tensor(expected), rtol=1e-6, atol=0)


def test_pytorch_lightning_cli_refuses_the_lightning_classes_which_is_why_the_port_exists(tmp_path: Path) -> None:
    out = _cli(tmp_path, "lightning_adamw.OneCycleWD", "--print_config")
    assert out.returncode != 0 and "does not correspond to a subclass of Callback" in out.stderr
