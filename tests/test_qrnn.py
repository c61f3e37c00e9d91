"""QRNN: the fast forget-mult against the plain loop (float64, forward and backward), the layer against its
definition, weight-drop on the gates, the AWD-QRNN network."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from models.qrnn import (
    AWDQRNN,
    CPU_BATCHED_MAX_STEP,
    CPU_CHANNELS_LAST_MAX_IN,
    CPU_CHANNELS_LAST_MIN_BATCH,
    CPU_CONV_MIN_WEIGHT,
    QRNNLayer,
    QRNNState,
    _backward_form,
    _grads_batched,
    _grads_per_step,
    forget_mult,
    forget_mult_loop,
)


def gates(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(shape, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(shape[1:], generator=g, dtype=torch.float64).requires_grad_()
    return f, x, h0


def test_forget_mult_gradcheck() -> None:
    f, x, h0 = gates((6, 2, 3), seed=0)
    assert torch.autograd.gradcheck(forget_mult, (f, x, h0))
    assert torch.autograd.gradcheck(lambda f, x: forget_mult(f, x), (f, x))  # zero initial state


@pytest.mark.parametrize("shape", [(1, 3, 4), (70, 5, 17), (33, 2, 3, 5), (4, 2, 4100)])  # the last: per-step backward
def test_forget_mult_equals_the_loop_forward_and_backward(shape: tuple[int, ...]) -> None:
    f, x, h0 = gates(shape, seed=1)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fast = forget_mult(f, x, h0)
    grads_fast = torch.autograd.grad(fast, (f, x, h0), grad)
    loop = forget_mult_loop(f, x, h0)
    grads_loop = torch.autograd.grad(loop, (f, x, h0), grad)
    torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_fast, grads_loop):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # both backward forms (CPU per step; batched, which CUDA uses) against the loop, here on CPU
    with torch.no_grad():
        for grads in (_grads_per_step, _grads_batched):
            for a, b in zip(grads(grad, f, x, h0, fast), grads_loop):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_backward_form_by_device_and_step_size() -> None:
    small = torch.zeros(70, 4, 64)  # 256 elements per step: per-op overhead dominates
    wide = torch.zeros(3, 20, 1150)  # 23,000: the per-step slabs stay in cache
    assert _backward_form(small) is _grads_batched
    assert _backward_form(torch.zeros(2, 1, CPU_BATCHED_MAX_STEP)) is _grads_batched
    assert _backward_form(torch.zeros(2, 1, CPU_BATCHED_MAX_STEP + 1)) is _grads_per_step
    assert _backward_form(wide) is _grads_per_step
    assert _backward_form(torch.zeros(2, 3, device="meta")) is _grads_batched  # not CPU: fewest launches


def test_forget_mult_edge_gates() -> None:
    f, x, h0 = gates((5, 2, 3), seed=3)
    with torch.no_grad():
        ones, zeros = torch.ones_like(f), torch.zeros_like(f)
        torch.testing.assert_close(forget_mult(ones, x, h0), x)  # f = 1: forget everything
        torch.testing.assert_close(forget_mult(zeros, x, h0), h0.expand_as(x))  # f = 0: keep the state
    with pytest.raises(ValueError, match="same shape"):
        forget_mult(f[:2], x)


def qrnn_by_definition(layer: QRNNLayer, x: torch.Tensor, c0: torch.Tensor, prev_x: torch.Tensor) -> torch.Tensor:
    """``z, f, o = tanh, sigmoid, sigmoid(W [x_t; x_{t-1}] + b)``, ``c_t = f z + (1 - f) c_{t-1}``, ``h = o c``."""
    weight, bias = layer.linear.weight, layer.linear.bias
    c, prev, out = c0, prev_x, []
    for x_t in x:
        source = torch.cat([x_t, prev], -1) if layer.window == 2 else x_t
        z, f, o = (source @ weight.t() + bias).chunk(3, -1)
        c = torch.sigmoid(f) * torch.tanh(z) + (1 - torch.sigmoid(f)) * c
        out.append(torch.sigmoid(o) * c)
        prev = x_t
    return torch.stack(out)


@pytest.mark.parametrize("window", [1, 2])
def test_layer_matches_its_definition_and_carries_state(window: int) -> None:
    torch.manual_seed(4)
    layer = QRNNLayer(5, 7, window=window).double()
    x = torch.randn(11, 3, 5, dtype=torch.float64)
    c0 = torch.randn(3, 7, dtype=torch.float64)
    prev_x = torch.randn(3, 5, dtype=torch.float64)
    state = QRNNState(c0, prev_x if window == 2 else None)
    out, new_state = layer(x, state)
    torch.testing.assert_close(out, qrnn_by_definition(layer, x, c0, prev_x), rtol=1e-12, atol=1e-12)
    # two windows with the carried state give the same as one
    first, carried = layer(x[:4], state)
    second, _ = layer(x[4:], carried)
    torch.testing.assert_close(torch.cat([first, second]), out, rtol=1e-12, atol=1e-12)
    assert new_state.c.shape == (3, 7) and (new_state.prev_x is None) == (window == 1)


@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("inputs", "hidden", "batch", "conv"),
    [
        (176, 128, CPU_CHANNELS_LAST_MIN_BATCH, "conv2d"),
        (176, 128, CPU_CHANNELS_LAST_MIN_BATCH - 1, "conv1d"),  # few streams, as in evaluation
        (CPU_CHANNELS_LAST_MAX_IN, 16, CPU_CHANNELS_LAST_MIN_BATCH, "conv1d"),  # wide inputs
    ],
)
def test_cpu_convolution_projection_equals_the_linear_one(
    window: int, dtype: torch.dtype, inputs: int, hidden: int, batch: int, conv: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large float32/bf16 projections on CPU run as a 1x1 convolution: same outputs and gradients as nn.Linear,
    weight-drop included (the same mask: the parametrized weight is read once per forward)."""
    import models.qrnn as qrnn

    calls = []
    original = getattr(qrnn.F, conv)
    monkeypatch.setattr(qrnn.F, conv, lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(8)
    layer = QRNNLayer(inputs, hidden, window=window, dropout_weight=0.3).to(dtype).train()
    assert layer.linear.weight.numel() >= CPU_CONV_MIN_WEIGHT
    x = torch.randn(9, batch, inputs, dtype=dtype, requires_grad=True)
    state = QRNNState(
        torch.randn(batch, hidden, dtype=dtype), torch.randn(batch, inputs, dtype=dtype) if window == 2 else None
    )

    def run() -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(9)  # the same weight-drop mask in both runs
        out, new_state = layer(x, state)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [out, new_state.c, x.grad, layer.linear.parametrizations.weight.original.grad, layer.linear.bias.grad]

    conv = run()
    assert calls, f"the {conv} path was not taken"
    if conv == "conv2d":
        with torch.no_grad():  # read and written in place: the gates come back as (time, batch, gates) in memory
            assert layer._project(torch.randn(9, batch, layer.linear.in_features, dtype=dtype)).is_contiguous()
    monkeypatch.setattr(qrnn, "CPU_CONV_MIN_WEIGHT", layer.linear.weight.numel() + 1)
    calls.clear()
    linear = run()
    assert not calls
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(conv, linear):
        torch.testing.assert_close(a, b, **tol)


def test_first_window_starts_from_zeros() -> None:
    torch.manual_seed(5)
    layer = QRNNLayer(4, 6, window=2, output_gate=False).double()
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    out, _ = layer(x)
    zeros_c, zeros_x = torch.zeros(2, 6, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    expected, _ = layer(x, QRNNState(zeros_c, zeros_x))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert layer.linear.out_features == 12  # f-pooling: no output gate


def test_weight_drop_on_the_gates() -> None:
    torch.manual_seed(6)
    layer = QRNNLayer(5, 8, window=1, dropout_weight=0.5).double().train()
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    original = layer.linear.parametrizations.weight.original
    with parametrize.cached():
        used = layer.linear.weight
    assert 0.3 < (used == 0).float().mean().item() < 0.7
    torch.testing.assert_close(used[used != 0], original[used != 0] / 0.5)
    assert not torch.allclose(layer(x)[0], layer(x)[0])
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0], rtol=0, atol=0)
    with parametrize.cached():
        assert layer.linear.weight is original  # the identity in eval


def test_awd_qrnn_network() -> None:
    torch.manual_seed(7)
    net = AWDQRNN(vocab_size=40, emb_size=6, hidden_size=9, num_layers=3)
    sizes = [(layer.input_size, layer.hidden_size, layer.window) for layer in net.layers]
    assert sizes == [(6, 9, 2), (9, 9, 1), (9, 6, 1)]
    tokens = torch.randint(0, 40, (10, 2))
    net.train()
    assert not torch.allclose(net(tokens).output, net(tokens).output)
    net.eval()
    whole = net(tokens)
    first = net(tokens[:3])
    second = net(tokens[3:], first.hidden)
    torch.testing.assert_close(torch.cat([first.output, second.output]), whole.output)
    assert net.decode(whole.output).shape == (10, 2, 40)
    net.train()
    net.decode(net(tokens).output).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_bad_window_is_rejected() -> None:
    with pytest.raises(ValueError, match="window must be 1 or 2"):
        QRNNLayer(3, 3, window=3)  # type: ignore[arg-type]
