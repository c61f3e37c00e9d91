"""Why the shipped forget-mult is not ``torch.compile``'d: the plain loop, the shipped form and a compiled form, timed
side by side (forward + backward, interleaved in one process).

The compiled form is the one a ``torch.compile`` user would write: inductor fuses ``chunk`` time steps of the
recurrence into one generated C++ kernel (forwards, and backwards with the gradient written out), written straight
into the output buffers; a fixed chunk keeps AWD-LSTM's variable BPTT lengths from recompiling, and the steps left
over run eagerly. It is checked against the loop in float64 before it is timed.

    python bench/bench_forget_mult_compile.py --threads 1
    python bench/bench_forget_mult_compile.py --chunk 8

Needs a C++ compiler (inductor's CPU backend). The first call compiles (about 10 s).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_qrnn import SIZES, compare, forget_mult_case  # noqa: E402
from models.qrnn import forget_mult_loop  # noqa: E402


def _forward_chunk(f: Tensor, x: Tensor, h: Tensor, out: Tensor) -> None:
    steps = []
    for t in range(f.shape[0]):
        h = h + f[t] * (x[t] - h)
        steps.append(h)
    out.copy_(torch.stack(steps))


def _backward_chunk(grad_h, f, x, h_before, h_rows, carry, grad_f, grad_x) -> Tensor:  # noqa: ANN001
    """``g_t = dL/dh_t + carry``, ``carry = (1 - f_t) g_t``; writes ``dL/df`` and ``dL/dx``, returns the carry."""
    gf, gx = [], []
    for t in range(f.shape[0] - 1, -1, -1):
        g = grad_h[t] + carry
        fg = f[t] * g
        carry = g - fg
        gx.append(fg)
        gf.append((x[t] - (h_rows[t - 1] if t > 0 else h_before)) * g)
    grad_f.copy_(torch.stack(gf[::-1]))
    grad_x.copy_(torch.stack(gx[::-1]))
    return carry


def compiled_forget_mult(chunk: int):  # noqa: ANN201
    forward_chunk = torch.compile(_forward_chunk, dynamic=True, fullgraph=True)
    backward_chunk = torch.compile(_backward_chunk, dynamic=True, fullgraph=True)

    class Compiled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, f: Tensor, x: Tensor, h0: Tensor) -> Tensor:  # noqa: ANN001
            h, prev, full = torch.empty_like(x), h0, x.size(0) // chunk * chunk
            for s in range(0, full, chunk):
                forward_chunk(f[s : s + chunk], x[s : s + chunk], prev, h[s : s + chunk])
                prev = h[s + chunk - 1]
            for t in range(full, x.size(0)):
                torch.lerp(prev, x[t], f[t], out=h[t])
                prev = h[t]
            ctx.save_for_backward(f, x, h0, h)
            return h

        @staticmethod
        def backward(ctx, grad_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
            f, x, h0, h = ctx.saved_tensors
            grad_h = grad_h.contiguous()
            grad_f, grad_x = torch.empty_like(f), torch.empty_like(x)
            full, carry = x.size(0) // chunk * chunk, torch.zeros_like(h0)
            for t in range(x.size(0) - 1, full - 1, -1):
                g = grad_h[t] + carry
                torch.mul(f[t], g, out=grad_x[t])
                torch.sub(x[t], h[t - 1] if t > 0 else h0, out=grad_f[t]).mul_(g)
                carry = g - grad_x[t]
            for s in range(full - chunk, -1, -chunk):
                e = s + chunk
                carry = backward_chunk(
                    grad_h[s:e], f[s:e], x[s:e], h[s - 1] if s else h0, h[s : e - 1], carry, grad_f[s:e], grad_x[s:e]
                )
            return grad_f, grad_x, carry

    def run(f: Tensor, x: Tensor, h0: Tensor | None = None) -> Tensor:
        return Compiled.apply(f.contiguous(), x.contiguous(), torch.zeros_like(x[0]) if h0 is None else h0)

    return run


def check(impl) -> None:  # noqa: ANN001
    """The compiled form equals the loop in float64, forwards and backwards (a length that leaves a remainder)."""
    g = torch.Generator().manual_seed(0)
    f = torch.rand(37, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(37, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 3, 5, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((impl(f, x, h0) * weight).sum(), (f, x, h0))
    loop = torch.autograd.grad((forget_mult_loop(f, x, h0) * weight).sum(), (f, x, h0))
    for a, b in zip(ours, loop):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def step_of(impl, seq: int, batch: int, width: int):  # noqa: ANN001, ANN201
    """One forward + backward of ``impl`` on random gates, as a closure for :func:`compare`."""
    f = torch.rand(seq, batch, width, requires_grad=True)
    x = torch.randn(seq, batch, width, requires_grad=True)
    grad = torch.randn(seq, batch, width)

    def step() -> None:
        f.grad = x.grad = None
        impl(f, x).backward(grad)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=16, help="time steps per compiled kernel")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    compiled = compiled_forget_mult(args.chunk)
    check(compiled)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, best of {args.repeats}, "
          f"forward + backward, float32, compiled chunk {args.chunk}\n")
    print("| seq x batch x width | loop | shipped | compiled | shipped vs loop | compiled vs loop |")
    print("|---|---|---|---|---|---|")
    for seq, batch, width in SIZES:
        torch.manual_seed(0)
        loop, shipped = forget_mult_case(seq, batch, width, device)
        run_compiled = step_of(compiled, seq, batch, width)
        base, ours = compare(loop, shipped, device, args.repeats)
        base2, theirs = compare(loop, run_compiled, device, args.repeats)
        base = min(base, base2)
        print(f"| {seq} x {batch} x {width} | {1e3 * base:.2f} ms | {1e3 * ours:.2f} ms | {1e3 * theirs:.2f} ms "
              f"| {base / ours:.2f}x | {base / theirs:.2f}x |")


if __name__ == "__main__":
    main()
