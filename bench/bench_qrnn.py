"""QRNN speed on this machine: a QRNN layer against ``torch.nn.LSTM`` of the same size, and the fast forget-mult
against the plain autograd loop, forward + backward. Ratios come from runs interleaved in the same process.

    python bench/bench_qrnn.py                     # CPU, torch's default thread count
    python bench/bench_qrnn.py --threads 1 --device cpu

Targets (issue 4): QRNN layer >= 2x faster than the LSTM; fast forget-mult >= 3x faster than the loop.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.qrnn import QRNNLayer, forget_mult, forget_mult_loop  # noqa: E402

# (seq_len, batch, width): the recipe's bptt 70 with CPU-sized batches, widths from tiny (per-op overhead dominates)
# to the recipe's 1150 / 1550 (memory traffic dominates)
SIZES = [(70, 4, 64), (70, 20, 256), (70, 20, 1150), (70, 20, 1550), (70, 100, 400)]


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(baseline: Callable[[], None], fast: Callable[[], None], device: torch.device, repeats: int) -> tuple:
    """Best-of-``repeats`` seconds of each, alternating so both see the same machine load."""
    for _ in range(2):
        baseline()
        fast()
    base, quick = [], []
    for _ in range(repeats):
        base.append(timed(baseline, device))
        quick.append(timed(fast, device))
    return min(base), min(quick)


def forget_mult_case(seq: int, batch: int, width: int, device: torch.device) -> tuple[Callable, Callable]:
    f = torch.rand(seq, batch, width, device=device, requires_grad=True)
    x = torch.randn(seq, batch, width, device=device, requires_grad=True)
    grad = torch.randn(seq, batch, width, device=device)

    def run(impl: Callable) -> Callable[[], None]:
        def step() -> None:
            f.grad = x.grad = None
            impl(f, x).backward(grad)

        return step

    return run(forget_mult_loop), run(forget_mult)


def layer_case(seq: int, batch: int, width: int, window: int, device: torch.device) -> tuple[Callable, Callable]:
    lstm = torch.nn.LSTM(width, width).to(device)
    qrnn = QRNNLayer(width, width, window=window).to(device)  # type: ignore[arg-type]
    x = torch.randn(seq, batch, width, device=device, requires_grad=True)

    def run(module: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x)[0].sum().backward()

        return step

    return run(lstm), run(qrnn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"best of {args.repeats}, forward + backward, float32\n")
    print("| case | seq x batch x width | baseline | ours | speed-up |")
    print("|---|---|---|---|---|")
    for seq, batch, width in SIZES:
        torch.manual_seed(0)
        base, fast = compare(*forget_mult_case(seq, batch, width, device), device, args.repeats)
        print(f"| forget-mult: loop vs fast | {seq} x {batch} x {width} | {1e3 * base:.2f} ms | {1e3 * fast:.2f} ms "
              f"| {base / fast:.2f}x |")
    for seq, batch, width in SIZES:
        for window in (1, 2):
            torch.manual_seed(0)
            base, fast = compare(*layer_case(seq, batch, width, window, device), device, args.repeats)
            print(f"| nn.LSTM vs QRNN layer (window {window}) | {seq} x {batch} x {width} | {1e3 * base:.2f} ms | "
                  f"{1e3 * fast:.2f} ms | {base / fast:.2f}x |")


if __name__ == "__main__":
    main()
