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
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _cli_timing import compare, timed_fit  # noqa: E402

from datamodules.cifar10 import CIFAR10DataModule, normalize, random_crop_flip  # noqa: E402
from lightning_adamw import OneCycle2018, OneCycleWD, OptimizerConfig  # noqa: E402
from models.wrn import WideResNet  # noqa: E402

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
                           "init_args": {"schedule": {"class_path": "lightning_adamw.OneCycle2018"}}}],
        },
        "model": {"class_path": "models.classifier.ImageClassifier",
                  "init_args": {"net": {"class_path": "models.wrn.WideResNet", "init_args": {"depth": 10, "width": 1}},
                                "optimizer": OPTIMIZER}},
        "data": {"class_path": "datamodules.cifar10.CIFAR10DataModule",
                 "init_args": {"data_dir": data_dir, "download": False, "batch_size": batch, "train_subset": subset}},
    }
    return timed_fit(config, workdir)


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
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.subset} images x {args.epochs} epochs")
    compare(args.rounds, images, lambda workdir: cli_run(args.data_dir, args.subset, args.epochs, args.batch, workdir),
            lambda: loop_run(args.data_dir, args.subset, args.epochs, args.batch))


if __name__ == "__main__":
    main_bench()
