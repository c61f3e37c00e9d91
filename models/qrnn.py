"""AWD-QRNN (Bradbury et al. 2017, "Quasi-Recurrent Neural Networks", arXiv:1611.01576), in plain PyTorch.

A QRNN layer computes its gates for all time steps at once (a width-1 or width-2 convolution over time, i.e. one
linear layer over the input and the previous input; on CPU run as a convolution by oneDNN), and the only sequential
part is the element-wise *forget-mult* ``c_t = f_t * z_t + (1 - f_t) * c_{t-1}``; the output is ``h_t = o_t * c_t``.
This follows the Salesforce ``pytorch-qrnn`` layer that AWD-LSTM's QRNN variant used, without its CuPy kernel:
:func:`forget_mult` is an ``autograd.Function`` with the gradient written out, one fused in-place operation per time
step forwards and one to five backwards, instead of the ~10 autograd operations per step of the plain loop
:func:`forget_mult_loop`, which is kept as the definition the tests and ``bench/`` compare against.

Defaults are the 2018 fast.ai WikiText-2 recipe: 4 layers of 1550, window 2 on the first layer, output gate,
dropouts 0.4 (input) / 0.4 (output) / 0.1 (weight) / 0.1 (embedding) / 0.2 (between layers).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.awd import AWDNetwork, add_weight_drop


def forget_mult_loop(f: Tensor, x: Tensor, h0: Tensor | None = None) -> Tensor:
    """``h_t = f_t * x_t + (1 - f_t) * h_{t-1}`` for ``(time, ...)`` tensors, step by step with autograd."""
    h = torch.zeros_like(x[0]) if h0 is None else h0
    out = []
    for f_t, x_t in zip(f.unbind(0), x.unbind(0)):
        h = f_t * x_t + (1 - f_t) * h
        out.append(h)
    return torch.stack(out)


def _grads_per_step(grad_h: Tensor, f: Tensor, x: Tensor, h0: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The forget-mult's gradients computed step by step while each step's slab is in cache (CPU).

    No whole-tensor pass at all: on CPU, whole-tensor ops run on OpenMP threads whose spinning then slows the serial
    loop down (BENCHMARKS.md, "Language models").
    """
    grad_f, grad_x = torch.empty_like(f), torch.empty_like(x)
    g = grad_h[-1].clone()
    # the per-step views made once (one C++ call each) instead of by indexing inside the loop
    gfs, gxs, ghs, fs, xs = (tensor.unbind(0) for tensor in (grad_f, grad_x, grad_h, f, x))
    prevs = (h0, *h[:-1].unbind(0))  # h_{t-1}
    for t in range(x.size(0) - 1, -1, -1):
        if t < x.size(0) - 1:
            g.sub_(gxs[t + 1]).add_(ghs[t])  # g_t = dL/dh_t + g_{t+1} - f_{t+1} g_{t+1}
        torch.mul(fs[t], g, out=gxs[t])
        torch.sub(xs[t], prevs[t], out=gfs[t]).mul_(g)
    return grad_f, grad_x, g - grad_x[0]


def _grads_batched(grad_h: Tensor, f: Tensor, x: Tensor, h0: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The forget-mult's gradients with one fused op per step and the rest as whole-tensor ops: the fewest kernel
    launches (GPU, where each op costs a launch whatever its size)."""
    g = torch.empty_like(grad_h)
    keep = torch.rsub(f[1:], 1)  # 1 - f_{t+1}
    g[-1] = grad_h[-1]
    gs, ghs, keeps = g.unbind(0), grad_h.unbind(0), keep.unbind(0)
    for t in range(x.size(0) - 2, -1, -1):
        torch.addcmul(ghs[t], keeps[t], gs[t + 1], out=gs[t])
    grad_f = torch.empty_like(f)
    torch.sub(x[1:], h[:-1], out=grad_f[1:])
    torch.sub(x[0], h0, out=grad_f[0])
    grad_f.mul_(g)
    return grad_f, g * f, g[0] * (1 - f[0])


#: On CPU, time steps of at most this many elements (batch x width) take :func:`_grads_batched`: there the cost is
#: per-op overhead, and one op per step beats five. Wider steps take :func:`_grads_per_step`, whose per-step slabs stay
#: in cache, where the batched form's whole-tensor passes are slower (``bench/bench_qrnn.py``; BENCHMARKS.md).
CPU_BATCHED_MAX_STEP = 8192


def _backward_form(grad_h: Tensor):
    """The backward form for this device and step size: see :data:`CPU_BATCHED_MAX_STEP`."""
    if grad_h.device.type != "cpu" or grad_h[0].numel() <= CPU_BATCHED_MAX_STEP:
        return _grads_batched
    return _grads_per_step


class _ForgetMult(torch.autograd.Function):
    """The forget-mult with its backward written out: one fused op per time step forwards.

    Backward: with ``g_t`` the total gradient reaching ``h_t``, ``g_t = dL/dh_t + (1 - f_{t+1}) g_{t+1}`` (the same
    recurrence run backwards), then ``dL/dx_t = f_t g_t``, ``dL/df_t = (x_t - h_{t-1}) g_t`` and
    ``dL/dh0 = (1 - f_0) g_0``; :func:`_grads_per_step` for wide steps on CPU, :func:`_grads_batched` otherwise
    (:func:`_backward_form`).
    """

    @staticmethod
    def forward(ctx, f: Tensor, x: Tensor, h0: Tensor) -> Tensor:
        h = torch.empty_like(x)
        prev = h0
        for x_t, f_t, h_t in zip(x.unbind(0), f.unbind(0), h.unbind(0)):
            torch.lerp(prev, x_t, f_t, out=h_t)  # prev + f * (x - prev)
            prev = h_t
        ctx.save_for_backward(f, x, h0, h)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f, x, h0, h = ctx.saved_tensors
        return _backward_form(grad_h)(grad_h.contiguous(), f, x, h0, h)


def forget_mult(f: Tensor, x: Tensor, h0: Tensor | None = None) -> Tensor:
    """``h_t = f_t * x_t + (1 - f_t) * h_{t-1}`` over the first dimension (fast form of :func:`forget_mult_loop`).

    Args:
        f: forget gates in [0, 1], ``(time, ...)``.
        x: candidate values, same shape.
        h0: the state before the first step, ``x.shape[1:]``; ``None`` for zeros.
    """
    if f.shape != x.shape:
        raise ValueError(f"forget_mult needs f and x of the same shape, got {tuple(f.shape)} and {tuple(x.shape)}.")
    h0 = torch.zeros_like(x[0]) if h0 is None else h0
    return _ForgetMult.apply(f.contiguous(), x.contiguous(), h0.contiguous())


#: Gate projections with at least this many weights run as a convolution on CPU (:meth:`QRNNLayer._project`); below
#: it the permutes cost more than oneDNN saves. The thresholds here were chosen from ``bench/bench_qrnn.py`` on an AMD
#: CPU (BENCHMARKS.md, "Language models"); set this one to ``math.inf`` to keep ``nn.Linear`` everywhere.
CPU_CONV_MIN_WEIGHT = 2**16
#: Of those, inputs narrower than this are read in place as channels-last images (batch as the image width), wider
#: ones as a 1-d convolution over time, which is faster once the input is wide.
CPU_CHANNELS_LAST_MAX_IN = 1536
#: ... and with at least this many streams (the images' width): with few streams, as in evaluation, the channels-last
#: form is slower than the 1-d one.
CPU_CHANNELS_LAST_MIN_BATCH = 8
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


class QRNNState(NamedTuple):
    """What a :class:`QRNNLayer` carries to the next window."""

    #: the last cell state ``c_T``, ``(batch, hidden)``
    c: Tensor
    #: the last input ``x_T`` (``(batch, input)``), which the next window's first width-2 convolution reads
    prev_x: Tensor | None


class QRNNLayer(nn.Module):
    """One QRNN layer with fo-pooling (forget and output gates).

    Args:
        input_size: input features.
        hidden_size: output features.
        window: convolution width over time: 1 (the current input) or 2 (also the previous one).
        output_gate: ``h = o * c`` (fo-pooling); ``False`` gives ``h = c`` (f-pooling).
        dropout_weight: DropConnect on the gate weights (AWD-LSTM applied weight-drop to the QRNN's linear layer).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        window: Literal[1, 2] = 1,
        output_gate: bool = True,
        dropout_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if window not in (1, 2):
            raise ValueError(f"QRNNLayer window must be 1 or 2, got {window}.")
        if not 0.0 <= dropout_weight < 1.0:
            raise ValueError(f"QRNNLayer dropout_weight must lie in [0, 1), got {dropout_weight}.")
        self.input_size, self.hidden_size, self.window, self.output_gate = input_size, hidden_size, window, output_gate
        self.linear = nn.Linear(window * input_size, (3 if output_gate else 2) * hidden_size)
        add_weight_drop(self.linear, "weight", dropout_weight)

    def forward(self, x: Tensor, state: QRNNState | None = None) -> tuple[Tensor, QRNNState]:
        """``(time, batch, input_size)`` -> ``(time, batch, hidden_size)`` and the state to carry."""
        if self.window == 2:
            first = state.prev_x if state is not None and state.prev_x is not None else torch.zeros_like(x[0])
            x_prev = torch.cat([first.unsqueeze(0), x[:-1]], 0)
            source = torch.cat([x, x_prev], 2)
        else:
            source = x
        gates = self._project(source).chunk(3 if self.output_gate else 2, dim=2)
        z, f = torch.tanh(gates[0]), torch.sigmoid(gates[1])
        c = forget_mult(f, z, None if state is None else state.c)
        h = torch.sigmoid(gates[2]) * c if self.output_gate else c
        return h, QRNNState(c[-1], x[-1] if self.window == 2 else None)

    def _project(self, source: Tensor) -> Tensor:
        """The gates before their activations, ``linear(source)``, ``(time, batch, gates * hidden)``.

        On CPU a large projection runs as a 1x1 convolution, the same product computed by oneDNN instead of the BLAS
        ``sgemm`` behind ``nn.Linear``, which is faster where MKL does not use the CPU's widest vector units (AMD);
        ``bench/bench_qrnn.py`` measures it.
        """
        weight, bias = self.linear.weight, self.linear.bias
        if (source.device.type != "cpu" or source.dtype not in _ONEDNN_DTYPES or weight.numel() < CPU_CONV_MIN_WEIGHT
                or not torch.backends.mkldnn.is_available()):
            return F.linear(source, weight, bias)
        if source.size(-1) < CPU_CHANNELS_LAST_MAX_IN and source.size(1) >= CPU_CHANNELS_LAST_MIN_BATCH:
            # (time, batch, in) read in place as channels-last images (time, in, 1, batch): no copy in or out, the
            # output comes back as (time, batch, out) in memory
            images = source.contiguous().permute(0, 2, 1).unsqueeze(2)
            kernel = weight[:, :, None, None].contiguous(memory_format=torch.channels_last)
            return F.conv2d(images, kernel, bias).squeeze(2).permute(0, 2, 1)
        # wide inputs, or few streams (evaluation): a 1-d convolution over time on (batch, in, time), which oneDNN
        # runs faster there despite the copies in and out
        return F.conv1d(source.permute(1, 2, 0), weight.unsqueeze(-1), bias).permute(2, 0, 1)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, window={self.window}, output_gate={self.output_gate}"


class AWDQRNN(AWDNetwork):
    """The AWD-QRNN network: embedding, weight-dropped QRNN layers, tied decoder.

    Args:
        vocab_size: number of words (given by :class:`~models.language_model.LanguageModel` once the data is known).
        emb_size: embedding width, also the last layer's output (400).
        hidden_size: width of the other layers (2018 recipe: 1550).
        num_layers: QRNN layers (4).
        first_window: convolution width of the first layer (2); the others use 1.
        output_gate: fo-pooling (``True``) or f-pooling.
        dropout_input: locked dropout on the embedding output (0.4).
        dropout_hidden: locked dropout between layers (0.2).
        dropout_output: locked dropout on the last output (0.4).
        dropout_embedding: word dropout on the embedding (0.1).
        dropout_weight: DropConnect on each layer's gate weights (0.1).
    """

    def __init__(
        self,
        vocab_size: int,
        emb_size: int = 400,
        hidden_size: int = 1550,
        num_layers: int = 4,
        first_window: Literal[1, 2] = 2,
        output_gate: bool = True,
        dropout_input: float = 0.4,
        dropout_hidden: float = 0.2,
        dropout_output: float = 0.4,
        dropout_embedding: float = 0.1,
        dropout_weight: float = 0.1,
    ) -> None:
        if num_layers < 1 or hidden_size < 1:
            raise ValueError(f"AWDQRNN needs num_layers >= 1 and hidden_size >= 1, got {num_layers}, {hidden_size}.")
        layers = [
            QRNNLayer(
                emb_size if i == 0 else hidden_size,
                emb_size if i == num_layers - 1 else hidden_size,
                window=first_window if i == 0 else 1,
                output_gate=output_gate,
                dropout_weight=dropout_weight,
            )
            for i in range(num_layers)
        ]
        super().__init__(
            vocab_size, emb_size, layers, dropout_input, dropout_hidden, dropout_output, dropout_embedding
        )
        self.hidden_size, self.num_layers, self.dropout_weight = hidden_size, num_layers, dropout_weight
