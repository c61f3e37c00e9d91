"""One optimizer step: Adam + OneCycleWD's decoupled decay vs ``torch.optim.AdamW(foreach=True)``.

Both run on ResNet-50's parameter list (25.6 M parameters) with the same gradients, interleaved round by round so
that machine noise hits both alike; the reported number is the median over rounds of (ours / AdamW).

    python bench/bench_onecycle_step.py --rounds 40
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torchvision.models import resnet50

from lightning_adamw import OneCycleWD, OptimizerConfig


def params_with_grads(device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    params = [p for p in resnet50(weights=None).to(device).parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    lr, wd = 3e-3, 0.1
    base_params = params_with_grads(args.device)
    ours_params = params_with_grads(args.device)
    baseline = torch.optim.AdamW(base_params, lr=lr, betas=(0.95, 0.99), weight_decay=wd, foreach=True)
    ours = OptimizerConfig("adamw", lr=lr, betas=(0.95, 0.99), weight_decay=wd, kwargs={"foreach": True}).build(
        ours_params)
    callback = OneCycleWD()
    total = args.rounds + args.warmup
    callback.attach([ours], total_steps=total)

    step = 0

    def ours_step() -> None:
        callback.apply(ours, step)
        ours.step()

    ratios, base_times, ours_times = [], [], []
    for r in range(total):
        # alternate the order so neither side always runs first
        if r % 2:
            t_ours, t_base = timed(ours_step, args.device), timed(baseline.step, args.device)
        else:
            t_base, t_ours = timed(baseline.step, args.device), timed(ours_step, args.device)
        step += 1
        if r >= args.warmup:
            ratios.append(t_ours / t_base)
            base_times.append(t_base)
            ours_times.append(t_ours)

    n_params = sum(p.numel() for p in base_params)
    print(f"device={args.device} torch={torch.__version__} cpu={platform.processor() or platform.machine()} "
          f"threads={torch.get_num_threads()} params={n_params / 1e6:.1f}M rounds={args.rounds}")
    print("| AdamW(foreach) step | Adam + OneCycleWD step | median ratio (ours / AdamW) |")
    print("|---|---|---|")
    print(f"| {statistics.median(base_times) * 1e3:.1f} ms | {statistics.median(ours_times) * 1e3:.1f} ms "
          f"| {statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
