"""What the CLI-vs-loop benchmarks share: the training time of a ``lightning_adamw fit`` run, and alternating
rounds of it against a hand-written loop (so that machine noise hits both alike), summarised by the median ratio."""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from lightning_adamw.cli import import_zoo, main

# the whole zoo, so the configs' short class names (ImageClassifier, AirbenchNet) resolve from any directory
import_zoo(Path(__file__).resolve().parents[1])


class TrainTime(pl.Callback):
    """Seconds from the start of training to its end (what the loop's timer spans too)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.elapsed = time.perf_counter() - self.start


def timed_fit(config: dict[str, Any], workdir: Path) -> float:
    """Seconds of training of ``fit`` on ``config`` (a :class:`TrainTime` added to its callbacks), output silenced."""
    config["trainer"]["callbacks"] = [*config["trainer"].get("callbacks", []), {"class_path": "_cli_timing.TrainTime"}]
    path = workdir / "cli.yaml"
    path.write_text(yaml.safe_dump(config))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli = main(["fit", "--config", str(path)])
    return next(c for c in cli.trainer.callbacks if isinstance(c, TrainTime)).elapsed


def compare(rounds: int, images: int, cli_run: Callable[[Path], float], loop_run: Callable[[], float],
            label: str = "") -> None:
    """Alternate ``cli_run(workdir)`` and ``loop_run()`` (seconds each, the CLI first in even rounds), print every
    round and a table of the medians: images/s of each and the ratio (CLI images/s) / (loop images/s)."""
    ratios, cli_rates, loop_rates = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            times = {}
            for which in (("cli", "loop") if r % 2 == 0 else ("loop", "cli")):
                times[which] = cli_run(Path(tmp)) if which == "cli" else loop_run()
            cli_rates.append(images / times["cli"])
            loop_rates.append(images / times["loop"])
            ratios.append(times["loop"] / times["cli"])
            print(f"round {r}: CLI {cli_rates[-1]:.0f} img/s, loop {loop_rates[-1]:.0f} img/s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"| LightningCLI fit{label} | hand-written loop{label} | median ratio (CLI / loop) |\n|---|---|---|")
    print(f"| {statistics.median(cli_rates):.0f} images/s | {statistics.median(loop_rates):.0f} images/s "
          f"| {statistics.median(ratios):.3f} |")
