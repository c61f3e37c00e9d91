"""The vectorised neural cache pointer against a direct, position-by-position implementation of the formula.

(The cache lowering perplexity on the real test file is checked in test_lm_training.py with a trained model.)
"""

from __future__ import annotations

import math

import pytest
import torch

from models.cache_pointer import NeuralCache


def cache_by_formula(
    hidden: torch.Tensor, p_vocab: torch.Tensor, targets: torch.Tensor, theta: float, lambda_: float, window: int
) -> torch.Tensor:
    """For every stream and position t, over the whole vocabulary:
    ``p_cache(w) = sum_{i in [t - window, t), x_{i+1} = w} softmax_i(theta h_i . h_t)``,
    ``p(w) = (1 - lambda) p_vocab(w) + lambda p_cache(w)``; ``p = p_vocab`` when nothing is cached yet.
    ``p_vocab`` here is a full distribution ``(time, batch, vocab)``; returns ``p(target)``."""
    steps, batch, vocab = p_vocab.shape
    out = torch.empty(steps, batch, dtype=p_vocab.dtype)
    for b in range(batch):
        for t in range(steps):
            p = p_vocab[t, b].clone()
            past = range(max(0, t - window), t)
            if len(past):
                scores = torch.stack([theta * hidden[i, b] @ hidden[t, b] for i in past])
                weights = torch.softmax(scores, 0)
                p_cache = torch.zeros(vocab, dtype=p.dtype)
                for weight, i in zip(weights, past):
                    p_cache[targets[i, b]] += weight
                assert math.isclose(p_cache.sum().item(), 1.0, rel_tol=1e-9)
                p = (1 - lambda_) * p + lambda_ * p_cache
            out[t, b] = p[targets[t, b]]
    return out


@pytest.mark.parametrize(("window", "chunk"), [(5, 4), (12, 7), (100, 10), (1, 3)])
def test_vectorised_cache_equals_the_formula(window: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(window)
    steps, batch, dim, vocab = 30, 3, 4, 6  # a small vocabulary, so words repeat and the cache matters
    hidden = torch.randn(steps, batch, dim, generator=g, dtype=torch.float64)
    p_vocab = torch.softmax(torch.randn(steps, batch, vocab, generator=g, dtype=torch.float64), -1)
    targets = torch.randint(0, vocab, (steps, batch), generator=g)
    theta, lambda_ = 0.662, 0.1279
    expected = cache_by_formula(hidden, p_vocab, targets, theta, lambda_, window)
    cache = NeuralCache(theta, lambda_, window)
    p_target = p_vocab.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got = torch.cat([
        cache(hidden[s:s + chunk], p_target[s:s + chunk], targets[s:s + chunk]) for s in range(0, steps, chunk)
    ])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert cache.keys is not None and cache.keys.size(0) == min(window, steps)
    cache.reset()
    torch.testing.assert_close(cache(hidden, p_target, targets), expected, rtol=1e-12, atol=1e-12)


def test_cache_helps_on_repeated_words_and_lambda_zero_is_the_model() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 1, 8, generator=g)
    targets = torch.tensor([3, 7] * 10).unsqueeze(1)  # a text that repeats itself
    p_vocab = torch.full((20, 1), 0.01)
    mixed = NeuralCache(theta=1.0, lambda_=0.5, window=10)(hidden, p_vocab, targets)
    assert mixed[0] == p_vocab[0] and torch.all(mixed[2:] > p_vocab[2:])
    torch.testing.assert_close(NeuralCache(1.0, 0.0, 10)(hidden, p_vocab, targets), p_vocab)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="theta must be positive"):
        NeuralCache(0.0, 0.1, 10)
    with pytest.raises(ValueError, match=r"lambda_ .* must lie in \[0, 1\]"):
        NeuralCache(0.5, 1.5, 10)
    with pytest.raises(ValueError, match="window must be a positive"):
        NeuralCache(0.5, 0.1, 0)
