"""AWD-LSTM: weight-drop really drops (and is the identity in eval), the AWD dropouts, the tied decoder."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from models.awd import DropConnect, LockedDropout, embedding_dropout
from models.awd_lstm import AWDLSTM

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def plain_copy(lstm: nn.LSTM, weight_hh: torch.Tensor | None = None) -> nn.LSTM:
    """An unparametrized ``nn.LSTM`` with the same weights (``weight_hh`` replacing the hidden-to-hidden one)."""
    plain = nn.LSTM(lstm.input_size, lstm.hidden_size).to(lstm.weight_ih_l0)
    with torch.no_grad():
        for name in ("weight_ih_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(plain, name).copy_(getattr(lstm, name))
        plain.weight_hh_l0.copy_(lstm.parametrizations.weight_hh_l0.original if weight_hh is None else weight_hh)
    return plain


def only_weight_drop(p: float = 0.5, **kwargs: int) -> AWDLSTM:
    sizes = {"vocab_size": 50, "emb_size": 6, "hidden_size": 10, "num_layers": 2} | kwargs
    return AWDLSTM(**sizes, dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0, dropout_embedding=0.0,
                   dropout_weight=p).double()


def test_weight_drop_really_drops_in_training() -> None:
    torch.manual_seed(0)
    lstm = only_weight_drop(0.5).layers[0].train()
    original = lstm.parametrizations.weight_hh_l0.original
    x = torch.randn(7, 3, 6, dtype=torch.float64)
    with parametrize.cached():  # the weight the LSTM uses in this forward
        used = lstm.weight_hh_l0
        out, _ = lstm(x)
    dropped = used == 0
    assert 0.35 < dropped.float().mean().item() < 0.65
    torch.testing.assert_close(used[~dropped], original[~dropped] / 0.5)  # inverted dropout scaling
    # the output is the plain LSTM's with exactly that dropped matrix
    torch.testing.assert_close(out, plain_copy(lstm, used)(x)[0], rtol=0, atol=1e-12)
    assert not torch.allclose(out, plain_copy(lstm)(x)[0])
    # a new mask every forward
    first, second = lstm(x)[0], lstm(x)[0]
    assert not torch.allclose(first, second)


def test_weight_drop_gradient_reaches_only_kept_weights() -> None:
    torch.manual_seed(1)
    lstm = only_weight_drop(0.5).layers[0].train()
    with parametrize.cached():
        used = lstm.weight_hh_l0
        lstm(torch.randn(5, 2, 6, dtype=torch.float64))[0].sum().backward()
    grad = lstm.parametrizations.weight_hh_l0.original.grad
    assert grad is not None and torch.all(grad[used == 0] == 0) and grad[used != 0].abs().sum() > 0


def test_eval_is_the_plain_lstm_with_the_same_weights() -> None:
    torch.manual_seed(2)
    net = only_weight_drop(0.5).eval()
    tokens = torch.randint(0, 50, (9, 4))
    out = net(tokens)
    x = net.embedding(tokens)
    for layer in net.layers:
        x = plain_copy(layer)(x)[0]
    torch.testing.assert_close(out.output, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(net(tokens).output, out.output, rtol=0, atol=0)  # deterministic


def test_training_forwards_differ_and_eval_forwards_agree() -> None:
    torch.manual_seed(3)
    net = AWDLSTM(50, 6, 10, 3).train()  # the recipe's dropouts
    tokens = torch.randint(0, 50, (8, 2))
    assert not torch.allclose(net(tokens).output, net(tokens).output)
    net.eval()
    torch.testing.assert_close(net(tokens).output, net(tokens).output, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_no_warnings_in_training_or_eval(device: str) -> None:
    """In particular no cuDNN 'weights are not part of single contiguous chunk of memory' warning."""
    net = AWDLSTM(50, 6, 10, 2).to(device)
    tokens = torch.randint(0, 50, (8, 2), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mode in (True, False):
            net.train(mode)
            out = net(tokens)
            hidden = out.hidden
            out = net(tokens, [tuple(h.detach() for h in state) for state in hidden])
            if mode:
                net.decode(out.output).sum().backward()


def test_layer_sizes_and_tied_decoder() -> None:
    net = AWDLSTM(vocab_size=30, emb_size=4, hidden_size=7, num_layers=3)
    assert [(lstm.input_size, lstm.hidden_size) for lstm in net.layers] == [(4, 7), (7, 7), (7, 4)]
    assert net.embedding.weight.abs().max() <= 0.1  # U(-0.1, 0.1)
    assert not hasattr(net, "decoder")  # the decoder's weight is the embedding itself
    net.eval()
    tokens = torch.randint(0, 30, (5, 2))
    out = net(tokens)
    logits = net.decode(out.output)
    torch.testing.assert_close(logits, out.output @ net.embedding.weight.t() + net.decoder_bias)
    assert logits.shape == (5, 2, 30) and [s[0].shape for s in out.hidden] == [(1, 2, 7), (1, 2, 7), (1, 2, 4)]


def test_hidden_state_carries_across_windows() -> None:
    torch.manual_seed(4)
    net = only_weight_drop(0.5).eval()
    tokens = torch.randint(0, 50, (12, 3))
    whole = net(tokens).output
    first = net(tokens[:5])
    second = net(tokens[5:], first.hidden)
    torch.testing.assert_close(torch.cat([first.output, second.output]), whole, rtol=0, atol=1e-12)


def test_embedding_dropout_drops_whole_words() -> None:
    torch.manual_seed(5)
    emb = nn.Embedding(20, 8)
    tokens = torch.randint(0, 20, (30, 4))
    out = embedding_dropout(emb, tokens, 0.5, training=True)
    ratio = out / emb(tokens)
    kept = ratio[..., 0]
    assert set(kept.flatten().round(decimals=5).tolist()) <= {0.0, 2.0} and (kept == 0).any()
    for word in tokens.unique():  # one decision per word, the same at every position
        assert torch.all(ratio[tokens == word] == ratio[tokens == word][0])
    assert torch.equal(embedding_dropout(emb, tokens, 0.5, training=False), emb(tokens))


def test_locked_dropout_shares_its_mask_over_time() -> None:
    torch.manual_seed(6)
    drop = LockedDropout(0.5).train()
    x = torch.ones(10, 3, 16)
    out = drop(x)
    assert torch.all(out == out[0]) and set(out.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(drop.eval()(x), x)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="DropConnect p must lie in"):
        DropConnect(1.0)
    with pytest.raises(ValueError, match="LockedDropout p must lie in"):
        LockedDropout(-0.1)
    with pytest.raises(ValueError, match="AWDLSTM needs num_layers >= 1"):
        AWDLSTM(10, num_layers=0)
    with pytest.raises(ValueError, match="vocab_size >= 2"):
        AWDLSTM(1, 4, 4, 1)


def test_no_weight_drop_means_a_plain_lstm() -> None:
    net = AWDLSTM(10, 4, 4, 1, dropout_weight=0.0)
    assert not parametrize.is_parametrized(net.layers[0])
