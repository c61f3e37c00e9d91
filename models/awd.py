"""The AWD regularisation shared by AWD-LSTM and AWD-QRNN (Merity et al. 2017, arXiv:1708.02182, section 4).

Building blocks first, then :class:`AWDNetwork`, the embedding -> recurrent layers -> tied decoder stack that
:class:`~models.awd_lstm.AWDLSTM` and :class:`~models.qrnn.AWDQRNN` fill with their layers.

* :func:`embedding_dropout`: whole words dropped from the embedding (the same words at every position of a batch).
* :class:`LockedDropout`: variational dropout, one mask per sequence shared over time.
* :class:`DropConnect`: a ``torch.nn.utils.parametrize`` parametrization that drops weights (weight-drop).
  Registered on a module's weight it recomputes the dropped weight at every forward in training and is the identity
  in evaluation; unlike the 2018 ``WeightDrop`` wrapper it needs no reassignment of parameters, so it keeps working
  with ``torch.nn.LSTM``'s flat-weight handling (which re-reads its weights when they change, see
  ``RNNBase._update_flat_weights``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize


def embedding_dropout(embedding: nn.Embedding, tokens: Tensor, p: float, training: bool) -> Tensor:
    """Look up ``tokens`` with whole rows of the embedding dropped with probability ``p`` (scaled by 1/(1-p)).

    Equivalent to AWD-LSTM's ``embedded_dropout`` (which masks the full matrix) but draws the mask only over the
    vocabulary and gathers it, so the cost does not grow with the embedding width.
    """
    emb = embedding(tokens)
    if not training or p == 0:
        return emb
    keep = torch.empty(embedding.num_embeddings, 1, device=emb.device, dtype=emb.dtype).bernoulli_(1 - p) / (1 - p)
    return emb * F.embedding(tokens, keep)


class LockedDropout(nn.Module):
    """Dropout with one mask per sequence and feature, shared across time (inputs are ``(time, batch, features)``)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"LockedDropout p must lie in [0, 1), got {p}.")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - self.p) / (1 - self.p)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DropConnect(nn.Module):
    """Weight-drop as a parametrization: ``dropout(W, p)`` in training, ``W`` itself in evaluation.

    Example::

        lstm = nn.LSTM(400, 1150)
        parametrize.register_parametrization(lstm, "weight_hh_l0", DropConnect(0.5))
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"DropConnect p must lie in (0, 1) (leave it out for no weight-drop), got {p}.")
        self.p = p

    def forward(self, weight: Tensor) -> Tensor:
        return F.dropout(weight, self.p, training=True) if self.training else weight

    def extra_repr(self) -> str:
        return f"p={self.p}"


def add_weight_drop(module: nn.Module, name: str, p: float) -> None:
    """Register :class:`DropConnect` with probability ``p`` on ``module.<name>`` (nothing when ``p == 0``)."""
    if p > 0:
        parametrize.register_parametrization(module, name, DropConnect(p))


class NetworkOutput(NamedTuple):
    """What an :class:`AWDNetwork` returns for a ``(time, batch)`` window of tokens."""

    #: last layer's output after the output dropout, ``(time, batch, emb_size)``: what the decoder reads
    output: Tensor
    #: last layer's output before it (TAR, the cache pointer's keys)
    raw_output: Tensor
    #: per-layer recurrent state to carry into the next window
    hidden: list[Any]


class AWDNetwork(nn.Module):
    """Embedding, recurrent layers and a decoder tied to the embedding, with AWD dropouts.

    Subclasses build ``layers``: modules called as ``layer(x, state) -> (y, new_state)`` on ``(time, batch, in)``
    inputs, the first taking ``emb_size`` features, the last returning ``emb_size`` (weight tying), with
    ``state=None`` meaning zeros.

    Args:
        vocab_size: number of words.
        emb_size: embedding width (also the last layer's output width).
        layers: the recurrent layers.
        dropout_input: locked dropout on the embedded input (AWD-LSTM ``dropouti``).
        dropout_hidden: locked dropout between layers (``dropouth``).
        dropout_output: locked dropout on the last layer's output (``dropout``).
        dropout_embedding: word dropout on the embedding (``dropoute``).
    """

    def __init__(
        self,
        vocab_size: int,
        emb_size: int,
        layers: list[nn.Module],
        dropout_input: float,
        dropout_hidden: float,
        dropout_output: float,
        dropout_embedding: float,
    ) -> None:
        super().__init__()
        if vocab_size < 2 or emb_size < 1 or not layers:
            raise ValueError(
                f"{type(self).__name__} needs vocab_size >= 2, emb_size >= 1 and at least one layer; got vocab_size="
                f"{vocab_size}, emb_size={emb_size}, {len(layers)} layers."
            )
        if not 0.0 <= dropout_embedding < 1.0:
            raise ValueError(f"dropout_embedding must lie in [0, 1), got {dropout_embedding}.")
        self.vocab_size, self.emb_size = vocab_size, emb_size
        self.embedding = nn.Embedding(vocab_size, emb_size)
        self.layers = nn.ModuleList(layers)
        self.input_dropout = LockedDropout(dropout_input)
        self.hidden_dropout = LockedDropout(dropout_hidden)
        self.output_dropout = LockedDropout(dropout_output)
        self.dropout_embedding = dropout_embedding
        # the decoder's weight is the embedding (Press & Wolf 2017; Inan et al. 2017); only its bias is its own
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)  # AWD-LSTM init_weights: U(-0.1, 0.1)

    def forward(self, tokens: Tensor, hidden: list[Any] | None = None) -> NetworkOutput:
        """Run ``(time, batch)`` token ids from the carried ``hidden`` (``None``: zeros)."""
        states = hidden if hidden is not None else [None] * len(self.layers)
        x = embedding_dropout(self.embedding, tokens, self.dropout_embedding, self.training)
        x = self.input_dropout(x)
        new_hidden = []
        # one weight-drop mask per window: parametrized weights are computed once and reused inside `cached`
        with parametrize.cached():
            for i, (layer, state) in enumerate(zip(self.layers, states)):
                x, new_state = layer(x, state)
                new_hidden.append(new_state)
                if i < len(self.layers) - 1:
                    x = self.hidden_dropout(x)
        return NetworkOutput(self.output_dropout(x), x, new_hidden)

    def decode(self, output: Tensor) -> Tensor:
        """Logits over the vocabulary from :attr:`NetworkOutput.output`."""
        return F.linear(output, self.embedding.weight, self.decoder_bias)
