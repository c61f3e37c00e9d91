"""Images per second of CIFAR-10's fast data path against a standard torchvision DataLoader, same augmentation.

Both produce normalised float32 training batches of 128 with reflect-pad-4 random crops and horizontal flips:

* fast: ``CIFAR10DataModule(loader="device")``: slices of one uint8 tensor, then ``batch_transform`` (normalise,
  crop and flip the whole batch at once), on the CPU here (on the GPU in a GPU run);
* baseline: ``CIFAR10DataModule(loader="torchvision", num_workers=2)``: a ``DataLoader`` whose 2 worker processes
  apply per-image PIL transforms (``RandomCrop(32, padding=4, padding_mode="reflect")``, ``RandomHorizontalFlip``,
  to tensor, normalise) and collate.

Each trial runs each path for ``--seconds`` after ``--warmup`` batches (worker start-up excluded), alternating the
two paths; the report gives the median images/s of each and the median of the per-trial ratios. The fast path runs
with one intra-op thread by default, as each DataLoader worker does: it then uses one core against the baseline's
two, and does not stall when another process holds a core (with two OpenMP threads on a two-core machine, every
small op waits for the descheduled thread).

    python bench/bench_cifar_loader.py --data-dir ../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the zoo runs from the checkout

from datamodules.cifar10 import CIFAR10DataModule  # noqa: E402


def images_per_second(batches: Callable[[], Iterator], prepare: Callable, warmup: int, seconds: float) -> float:
    """Images/s of ``prepare(batch)`` over at least ``seconds`` after ``warmup`` batches (new epochs as needed)."""
    iterator = batches()
    for _ in range(warmup):
        prepare(next(iterator))
    seen, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = batches()
            continue
        seen += prepare(batch).shape[0]
    return seen / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/cifar10", help="folder holding cifar-10-batches-py/")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per path and trial")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches before each trial")
    parser.add_argument("--repeats", type=int, default=5, help="trials per path")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the fast path (default 1, like each DataLoader worker)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fast = CIFAR10DataModule(data_dir=args.data_dir, download=False, loader="device")
    baseline = CIFAR10DataModule(data_dir=args.data_dir, download=False, loader="torchvision", num_workers=2)
    for dm in (fast, baseline):
        dm.setup("fit")
    fast_rates, baseline_rates = [], []
    baseline_loader = baseline.train_dataloader()  # persistent workers: started once, reused by every trial
    for _ in range(args.repeats):
        fast_rates.append(images_per_second(lambda: iter(fast.train_dataloader()),
                                            lambda b: fast.batch_transform(b[0], train=True), args.warmup,
                                            args.seconds))
        baseline_rates.append(images_per_second(lambda: iter(baseline_loader), lambda b: b[0], args.warmup,
                                                args.seconds))
    ratios = [f / b for f, b in zip(fast_rates, baseline_rates)]

    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} at the end, torch {torch.__version__}")
    print(f"fast path    images/s per trial: {[round(r) for r in fast_rates]}")
    print(f"torchvision  images/s per trial: {[round(r) for r in baseline_rates]}")
    print(f"median: fast {statistics.median(fast_rates):,.0f} images/s, torchvision DataLoader (2 workers) "
          f"{statistics.median(baseline_rates):,.0f} images/s, ratio {statistics.median(ratios):.1f}x "
          f"(per-trial ratios {[round(r, 1) for r in ratios]})")


if __name__ == "__main__":
    main()
