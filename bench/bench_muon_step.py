"""One optimizer step: ``muon`` (MuonAdamW + OneCycleWD's decay) vs torch's own pair, ``Muon`` + ``AdamW``.

The baseline is what a user writes by hand: ``torch.optim.Muon`` over the hidden matrices and ``torch.optim.AdamW``
over the rest, each decaying its own weights. torch's Muon refuses conv kernels, so the baseline network is a stack
of ``Linear`` layers (an MLP with an embedding and a head, split as ``muon_split`` does). Both sides get the same
gradients and are timed interleaved round by round; the number reported is the median over rounds of
(ours / torch's pair). A second line times a conv network (WRN-10-1, CIFAR-10 quickstart), where only ours can run
Muon, against AdamW alone, to show what Muon's Newton-Schulz iterations cost there.

    python bench/bench_muon_step.py --rounds 30
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_adamw import OneCycleWD, OptimizerConfig  # noqa: E402
from lightning_adamw.muon import USE_MUON_KEY  # noqa: E402
from models.wrn import WideResNet  # noqa: E402


def mlp(width: int, depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(1000, width), *[nn.Linear(width, width) for _ in range(depth)],
                         nn.Linear(width, 1000))


def with_grads(module: nn.Module, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return module


def interleaved(baseline: Callable[[], None], ours: Callable[[], None], rounds: int, warmup: int) -> tuple:
    ratios, base_times, ours_times = [], [], []
    for r in range(rounds + warmup):
        first, second = (ours, baseline) if r % 2 else (baseline, ours)
        times = []
        for fn in (first, second):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        t_base, t_ours = (times[1], times[0]) if r % 2 else (times[0], times[1])
        if r >= warmup:
            ratios.append(t_ours / t_base)
            base_times.append(t_base)
            ours_times.append(t_ours)
    return statistics.median(base_times), statistics.median(ours_times), statistics.median(ratios)


def ours_stepper(module: nn.Module, lr: float, wd: float, total: int) -> tuple[torch.optim.Optimizer, Callable]:
    optimizer = OptimizerConfig("muon", lr=lr, betas=(0.95, 0.99), weight_decay=wd).build(module)
    callback = OneCycleWD()
    callback.attach([optimizer], total_steps=total)
    step = [0]

    def run() -> None:
        callback.apply(optimizer, step[0])
        optimizer.step()
        step[0] += 1

    return optimizer, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    args = parser.parse_args()
    lr, wd, total = 3e-3, 0.1, args.rounds + args.warmup + 1
    print(f"torch={torch.__version__} cpu={platform.processor() or platform.machine()} "
          f"threads={torch.get_num_threads()} rounds={args.rounds}")
    print("| network | baseline | baseline step | ours step | median ratio (ours / baseline) |")
    print("|---|---|---|---|---|")

    base_net, ours_net = with_grads(mlp(args.width, args.depth)), with_grads(mlp(args.width, args.depth))
    ours, ours_step = ours_stepper(ours_net, lr, wd, total)
    hidden_ids = {id(p) for g in ours.param_groups if g[USE_MUON_KEY] for p in g["params"]}
    index = {id(p): i for i, p in enumerate(ours_net.parameters())}
    base_params = list(base_net.parameters())
    hidden = [base_params[index[i]] for i in hidden_ids]
    rest = [p for p in base_params if all(p is not h for h in hidden)]
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=lr, betas=(0.95, 0.99), weight_decay=wd)

    def pair() -> None:
        muon.step()
        adamw.step()

    n = sum(p.numel() for p in base_params) / 1e6
    base_t, ours_t, ratio = interleaved(pair, ours_step, args.rounds, args.warmup)
    print(f"| MLP {args.depth} x {args.width} + embedding/head ({n:.1f} M) | torch Muon + AdamW | "
          f"{base_t * 1e3:.1f} ms | {ours_t * 1e3:.1f} ms | {ratio:.3f} |")

    base_net, ours_net = with_grads(WideResNet(10, 1, 10)), with_grads(WideResNet(10, 1, 10))
    _, ours_step = ours_stepper(ours_net, lr, wd, total)
    adamw = torch.optim.AdamW(base_net.parameters(), lr=lr, betas=(0.95, 0.99), weight_decay=wd)
    n = sum(p.numel() for p in base_net.parameters()) / 1e6
    base_t, ours_t, ratio = interleaved(adamw.step, ours_step, args.rounds, args.warmup)
    print(f"| WRN-10-1 ({n:.2f} M, conv kernels) | torch AdamW alone | {base_t * 1e3:.1f} ms | {ours_t * 1e3:.1f} ms "
          f"| {ratio:.3f} |")


if __name__ == "__main__":
    main()
