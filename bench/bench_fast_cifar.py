"""Training throughput of the airbench94 network (``configs/cifar10_fast.yaml``) on this machine.

Two measurements, both on real CIFAR-10 with the config's data path (device loader, alternating flips, translate-by-2
crops) and optimizer (Nesterov SGD, BatchNorm biases at 64x the lr, decoupled decay through OneCycleWD, label
smoothing 0.2):

1. images/s of a hand-written training step in fp32 and in bf16 autocast, both channels-last;
2. the same-run ratio of ``LightningCLI fit`` (the shipped config, bf16, validation and checkpoints off) against a
   hand-written loop doing the same work (bf16 autocast, channels-last), timed from ``on_train_start`` to
   ``on_train_end`` and over the same span in the loop. Runs alternate; the median ratio is reported.

    python bench/bench_fast_cifar.py --data-dir ../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _cli_timing import compare, timed_fit  # noqa: E402

from datamodules.cifar10 import CIFAR10DataModule  # noqa: E402
from lightning_adamw import OneCycleWD, OptimizerConfig, Phase, Schedule  # noqa: E402
from models.airbench import AirbenchNet  # noqa: E402

CONFIG = ROOT / "configs" / "cifar10_fast.yaml"


def shipped() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def setup(data_dir: str, subset: int, batch: int) -> tuple[CIFAR10DataModule, AirbenchNet, torch.optim.Optimizer]:
    config = shipped()
    data_args = {**config["data"]["init_args"], "data_dir": data_dir, "download": False, "batch_size": batch,
                 "train_subset": subset}
    data = CIFAR10DataModule(**data_args)
    data.setup("fit")
    torch.manual_seed(0)
    model_args = config["model"]["init_args"]
    net = AirbenchNet(**model_args["net"]["init_args"])
    net.init_from_data(data.train_images(net.init_images))
    net.to(memory_format=torch.channels_last)
    optimizer = OptimizerConfig(**model_args["optimizer"]).build(net.layer_groups())
    return data, net, optimizer


def loop_run(data_dir: str, subset: int, epochs: int, batch: int, precision: str = "bf16") -> float:
    """Seconds for ``epochs`` epochs of the config's training, written by hand."""
    data, net, optimizer = setup(data_dir, subset, batch)
    loader = data.train_dataloader()
    phases = shipped()["trainer"]["callbacks"][0]["init_args"]["schedule"]["init_args"]["phases"]
    schedule = OneCycleWD(Schedule([Phase(p["frac"], tuple(p["lr"]), tuple(p["momentum"])) for p in phases]))
    schedule.attach([optimizer], epochs * len(loader))
    smoothing = shipped()["model"]["init_args"]["label_smoothing"]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    net.train()
    step = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        net.set_epoch(epoch)
        for images, labels in loader:
            x = data.batch_transform(images, train=True).contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = F.cross_entropy(net(x), labels, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            schedule.apply(optimizer, step)
            optimizer.step()
            step += 1
    return time.perf_counter() - start


def cli_run(data_dir: str, subset: int, epochs: int, batch: int, workdir: Path) -> float:
    config = shipped()
    config["trainer"].update({"accelerator": "cpu", "max_epochs": epochs, "limit_val_batches": 0,
                              "num_sanity_val_steps": 0, "enable_checkpointing": False})
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(workdir)
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]
    config["data"]["init_args"].update({"data_dir": data_dir, "download": False, "batch_size": batch,
                                        "train_subset": subset})
    return timed_fit(config, workdir)


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/cifar10")
    parser.add_argument("--subset", type=int, default=2048, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    images = args.subset * args.epochs
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.subset} images x {args.epochs} "
          f"epochs, batch {args.batch}", flush=True)
    for precision in ("fp32", "bf16"):
        seconds = loop_run(args.data_dir, args.subset, args.epochs, args.batch, precision)
        print(f"| hand-written step, {precision}, channels-last | {images / seconds:.0f} images/s |", flush=True)
    compare(args.rounds, images, lambda workdir: cli_run(args.data_dir, args.subset, args.epochs, args.batch, workdir),
            lambda: loop_run(args.data_dir, args.subset, args.epochs, args.batch), label=" (bf16)")


if __name__ == "__main__":
    main_bench()
