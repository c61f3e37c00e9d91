"""The neural cache pointer (Grave, Joulin & Usunier 2017, "Improving Neural Language Models with a Continuous
Cache", arXiv:1612.04426), as an evaluation-time add-on to a trained language model.

The cache holds the last ``window`` last-layer hidden states ``h_i`` together with the word that followed each
(``x_{i+1}``). Predicting the word after position ``t``::

    p_cache(w) = sum_{i in cache, x_{i+1} = w} softmax_i(theta * h_i . h_t)
    p(w)       = (1 - lambda) * p_vocab(w) + lambda * p_cache(w)

With an empty cache (the very first word) ``p = p_vocab``. AWD-LSTM's ``pointer.py`` switches the cache on only once
``window`` states are stored; here it is used from the second word on, as the formula reads. WikiText-2 values
(AWD-LSTM README): ``theta=0.662``, ``lambda=0.1279``, ``window=3785``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class NeuralCache:
    """A continuous cache over parallel evaluation streams, vectorised over each window of positions.

    Args:
        theta: the flatness of the cache distribution (scale of the dot products).
        lambda_: the weight of the cache in the mixture, the paper's ``lambda`` (``lambda`` is a Python keyword;
            :class:`~models.language_model.LanguageModel` takes it as ``cache_lambda``, like ``cache_theta``).
        window: how many past positions each stream keeps.

    Example::

        cache = NeuralCache(theta=0.662, lambda_=0.1279, window=3785)
        for hidden, p_target, targets in windows:      # (time, batch, dim), (time, batch), (time, batch)
            p = cache(hidden, p_target, targets)        # mixed probability of each target
    """

    def __init__(self, theta: float, lambda_: float, window: int) -> None:
        if theta <= 0:
            raise ValueError(f"NeuralCache theta must be positive, got {theta}.")
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError(f"NeuralCache lambda_ (the cache's mixture weight) must lie in [0, 1], got {lambda_}.")
        if window < 1:
            raise ValueError(f"NeuralCache window must be a positive number of positions, got {window}.")
        self.theta, self.lambda_, self.window = theta, lambda_, window
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def reset(self) -> None:
        """Empty the cache (a new evaluation pass)."""
        self.keys = self.values = None

    @torch.no_grad()
    def __call__(self, hidden: Tensor, p_vocab: Tensor, targets: Tensor) -> Tensor:
        """Mixed probability of each target, then store this window's states in the cache.

        Args:
            hidden: last-layer hidden states ``(time, batch, dim)``.
            p_vocab: the model's probability of each target ``(time, batch)``.
            targets: the words that follow each position ``(time, batch)``.
        """
        steps = hidden.size(0)
        if self.keys is None or self.values is None:
            keys, values = hidden, targets
        else:
            keys, values = torch.cat([self.keys, hidden]), torch.cat([self.values, targets])
        past = keys.size(0) - steps
        query_at = past + torch.arange(steps, device=hidden.device).unsqueeze(1)  # (time, 1)
        key_at = torch.arange(keys.size(0), device=hidden.device).unsqueeze(0)  # (1, entries)
        valid = (key_at < query_at) & (key_at >= query_at - self.window)  # (time, entries)
        has_cache = valid.any(1)
        # a query with no entry yet gets uniform (finite) weights; its p_cache is not used
        valid = valid | ~has_cache.unsqueeze(1)
        scores = self.theta * torch.einsum("tbd,ebd->bte", hidden, keys)
        attention = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
        same_word = values.t().unsqueeze(1) == targets.t().unsqueeze(2)  # (batch, time, entries)
        p_cache = (attention * same_word).sum(-1).t()  # (time, batch)
        mixed = (1 - self.lambda_) * p_vocab + self.lambda_ * p_cache
        self.keys, self.values = keys[-self.window:], values[-self.window:]
        return torch.where(has_cache.unsqueeze(1), mixed, p_vocab)
