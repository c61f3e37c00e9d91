"""Training throughput: ``LightningCLI fit`` vs a hand-written PyTorch loop, same model, data, optimizer, schedule.

Both train a narrow WRN (``WideResNet(depth=10, width=1)``) on the same real CIFAR-10 subset with the fast device
data path (uint8 tensor, batched crop/flip/normalise), Adam + decoupled weight decay 0.1 and the 2018 1cycle through
OneCycleWD (the loop drives it with ``attach``/``apply``). The CLI run keeps Lightning's defaults that cost time per
step (progress bar, TensorBoard logging every 50 steps) and skips validation and checkpointing, which the loop does
not do. Training time runs from ``on_train_start`` to ``on_train_end`` and the same span in the loop. Runs alternate;
the number reported is the median over rounds of (CLI images/s) / (loop images/s).

    python bench/bench_cli_vs_loop.py --data-dir ../shared/data/cifar10 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.cifar10 import CIFAR10DataModule, normalize, random_crop_flip  # noqa: E402
from lightning_adamw import OneCycle2018, OneCycleWD, OptimizerConfig  # noqa: E402
from lightning_adamw.cli import main  # noqa: E402
from models.wrn import WideResNet  # noqa: E402


class TrainTime(pl.Callback):
    """Seconds from the start of training to its end (what the loop's timer spans too)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.elapsed = time.perf_counter() - self.start


OPTIMIZER = {"name": "adam", "wd_mode": "decoupled", "lr": 3e-3, "weight_decay": 0.1, "betas": [0.95, 0.99]}


def cli_run(data_dir: str, subset: int, epochs: int, batch: int, workdir: Path) -> float:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": epochs, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(workdir), "name": "cli"}},
            "callbacks": [{"class_path": "lightning_adamw.OneCycleWD",
                           "init_args": {"schedule": {"class_path": "lightning_adamw.OneCycle2018"}}},
                          {"class_path": "bench_cli_vs_loop.TrainTime"}],
        },
        "model": {"class_path": "models.classifier.ImageClassifier",
                  "init_args": {"net": {"class_path": "models.wrn.WideResNet", "init_args": {"depth": 10, "width": 1}},
                                "optimizer": OPTIMIZER}},
        "data": {"class_path": "datamodules.cifar10.CIFAR10DataModule",
                 "init_args": {"data_dir": data_dir, "download": False, "batch_size": batch, "train_subset": subset}},
    }
    path = workdir / "cli.yaml"
    path.write_text(yaml.safe_dump(config))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli = main(["fit", "--config", str(path)])
    timer = next(c for c in cli.trainer.callbacks if type(c).__name__ == "TrainTime")
    return timer.elapsed


def loop_run(data_dir: str, subset: int, epochs: int, batch: int) -> float:
    torch.manual_seed(0)
    data = CIFAR10DataModule(data_dir=data_dir, download=False, batch_size=batch, train_subset=subset)
    data.setup("fit")
    images, labels = data.splits["train"]
    model = WideResNet(depth=10, width=1)
    opt_config = OptimizerConfig(**{k: tuple(v) if k == "betas" else v for k, v in OPTIMIZER.items()})
    optimizer = opt_config.build(model.layer_groups())
    schedule = OneCycleWD(OneCycle2018())
    steps_per_epoch = -(-len(labels) // batch)
    schedule.attach([optimizer], epochs * steps_per_epoch)
    augment = torch.Generator().manual_seed(0)
    order_gen = torch.Generator().manual_seed(0)
    model.train()
    step = 0
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=order_gen)
        for i in range(steps_per_epoch):
            index = order[i * batch:(i + 1) * batch]
            x = normalize(random_crop_flip(images[index], augment))
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            schedule.apply(optimizer, step)
            optimizer.step()
            step += 1
    return time.perf_counter() - start


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/cifar10")
    parser.add_argument("--subset", type=int, default=5120)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    images = args.subset * args.epochs
    ratios, cli_rates, loop_rates = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = (("cli", "loop") if r % 2 == 0 else ("loop", "cli"))
            times = {}
            for which in order:
                if which == "cli":
                    times[which] = cli_run(args.data_dir, args.subset, args.epochs, args.batch, Path(tmp))
                else:
                    times[which] = loop_run(args.data_dir, args.subset, args.epochs, args.batch)
            cli_rates.append(images / times["cli"])
            loop_rates.append(images / times["loop"])
            ratios.append(times["loop"] / times["cli"])
            print(f"round {r}: CLI {cli_rates[-1]:.0f} img/s, loop {loop_rates[-1]:.0f} img/s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.subset} images x {args.epochs} epochs")
    print("| LightningCLI fit | hand-written loop | median ratio (CLI / loop) |\n|---|---|---|")
    print(f"| {statistics.median(cli_rates):.0f} images/s | {statistics.median(loop_rates):.0f} images/s "
          f"| {statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main_bench()
