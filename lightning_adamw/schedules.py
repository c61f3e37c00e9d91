"""Schedule shapes as data: phases with start/end values, each a fraction of the run.

A schedule is a pure function of ``(step, total_steps)``, so resuming needs no scheduler state. Learning rates are
multipliers of each parameter group's maximum lr (discriminative lrs scale together); momentum values are absolute
(SGD ``momentum`` or Adam ``beta1``).

Phase boundaries follow the step arithmetic of ``torch.optim.lr_scheduler.OneCycleLR`` so that :class:`OneCycle`
reproduces it step for step: over ``T`` optimizer steps (indices ``0 .. T-1``) phase ``k`` ends at step
``sum(frac[:k+1]) * T - (k + 1)`` and the last phase ends at ``T - 1``, where its end value is reached.

Presets:

* :class:`OneCycle`: PyTorch's ``OneCycleLR`` (two-phase cosine by default, ``three_phase=True`` optional).
* :class:`OneCycle2018`: the 2018 study's three linear phases ``[(1-pct)/2, (1-pct)/2, pct]``.
* :class:`OneCycleLM`: the four-phase language-model shape (warm-up, plateau, cool-down, cosine to zero).
* :class:`Constant`: the maximum lr throughout and momentum untouched (decoupled decay without a schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Anneal = Literal["linear", "cos", "constant"]


@dataclass(frozen=True)
class Phase:
    """One phase of a schedule.

    Args:
        frac: the fraction of the run this phase covers; the fractions of a schedule sum to 1.
        lr: ``(start, end)`` learning-rate multipliers of the group's maximum lr.
        momentum: ``(start, end)`` momentum (or Adam beta1), or ``None`` to leave momentum alone.
        anneal: ``"linear"``, ``"cos"`` (half cosine, as ``OneCycleLR``) or ``"constant"`` (holds the start values).
    """

    frac: float
    lr: tuple[float, float]
    momentum: tuple[float, float] | None = None
    anneal: Anneal = "linear"

    def __post_init__(self) -> None:
        if not 0.0 < self.frac <= 1.0:
            raise ValueError(f"Phase frac must lie in (0, 1], got {self.frac}.")
        if self.anneal not in ("linear", "cos", "constant"):
            raise ValueError(f"Phase anneal must be 'linear', 'cos' or 'constant', got {self.anneal!r}.")
        if min(self.lr) < 0:
            raise ValueError(f"Phase lr multipliers must be >= 0, got {self.lr}.")


def _anneal(kind: Anneal, start: float, end: float, pct: float) -> float:
    if kind == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    if kind == "linear":
        return (end - start) * pct + start
    return start


class Schedule:
    """A sequence of :class:`Phase` objects covering the whole run.

    Args:
        phases: the phases in order; their ``frac`` values must sum to 1.

    Example::

        Schedule([Phase(0.25, lr=(0.1, 1.0), momentum=(0.95, 0.85)),
                  Phase(0.75, lr=(1.0, 0.0), momentum=(0.85, 0.95), anneal="cos")])
    """

    def __init__(self, phases: list[Phase]) -> None:
        if not phases:
            raise ValueError("A schedule needs at least one phase.")
        total = sum(p.frac for p in phases)
        if not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-9):
            raise ValueError(f"Phase fractions must sum to 1, got {total} from {[p.frac for p in phases]}.")
        self.phases = list(phases)

    @property
    def cycles_momentum(self) -> bool:
        """Whether any phase sets momentum."""
        return any(p.momentum is not None for p in self.phases)

    def phase_ends(self, total_steps: int) -> list[float]:
        """The step at which each phase ends (OneCycleLR's arithmetic, see the module docstring)."""
        ends, acc = [], 0.0
        for k, phase in enumerate(self.phases[:-1]):
            acc += phase.frac
            ends.append(float(acc * total_steps) - (k + 1))
        ends.append(float(total_steps - 1))
        return ends

    def __call__(self, step: int, total_steps: int) -> tuple[float, float | None]:
        """``(lr multiplier, momentum or None)`` at optimizer step ``step`` (0-based) of ``total_steps``."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
        step = min(max(step, 0), total_steps - 1)
        start = 0.0
        ends = self.phase_ends(total_steps)
        for k, (phase, end) in enumerate(zip(self.phases, ends)):
            if step <= end or k == len(self.phases) - 1:
                pct = (step - start) / (end - start) if end > start else 1.0
                lr = _anneal(phase.anneal, phase.lr[0], phase.lr[1], pct)
                mom = None if phase.momentum is None else _anneal(phase.anneal, *phase.momentum, pct)
                return lr, mom
            start = end
        raise AssertionError("unreachable")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.phases!r})"


class OneCycle(Schedule):
    """PyTorch's ``OneCycleLR`` as phases (same arguments, same defaults).

    Args:
        pct_start: fraction of the run spent raising the lr.
        div_factor: initial lr = max lr / div_factor.
        final_div_factor: minimum lr = initial lr / final_div_factor.
        anneal: ``"cos"`` or ``"linear"``.
        three_phase: rise, symmetric fall back to the initial lr, then anneal to the minimum.
        base_momentum: momentum at the lr peak.
        max_momentum: momentum at the start and the end.
        cycle_momentum: set momentum at all.
    """

    def __init__(
        self,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        anneal: Literal["cos", "linear"] = "cos",
        three_phase: bool = False,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        cycle_momentum: bool = True,
    ) -> None:
        if not 0.0 < pct_start < (0.5 if three_phase else 1.0):
            raise ValueError(f"pct_start must lie in (0, {0.5 if three_phase else 1}), got {pct_start}.")
        if div_factor <= 0 or final_div_factor <= 0:
            raise ValueError("div_factor and final_div_factor must be positive.")
        self.pct_start, self.div_factor, self.final_div_factor = pct_start, div_factor, final_div_factor
        initial, minimum = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)
        hi, lo = max_momentum, base_momentum

        def mom(a: float, b: float) -> tuple[float, float] | None:
            return (a, b) if cycle_momentum else None

        if three_phase:
            phases = [
                Phase(pct_start, (initial, 1.0), mom(hi, lo), anneal),
                Phase(pct_start, (1.0, initial), mom(lo, hi), anneal),
                Phase(1.0 - 2 * pct_start, (initial, minimum), mom(hi, hi), anneal),
            ]
        else:
            phases = [
                Phase(pct_start, (initial, 1.0), mom(hi, lo), anneal),
                Phase(1.0 - pct_start, (1.0, minimum), mom(lo, hi), anneal),
            ]
        super().__init__(phases)


class OneCycle2018(OneCycle):
    """The 2018 study's 1cycle: linear ``max/div -> max -> max/div -> max/(final_div * div)``.

    Momentum ``max -> base -> max``, then constant. Phase lengths ``[(1-pct)/2, (1-pct)/2, pct]``; equivalent to
    ``OneCycleLR(pct_start=(1-pct)/2, three_phase=True, anneal_strategy="linear", final_div_factor=100)``.

    Args:
        div_factor: start lr = max lr / div_factor (CIFAR-10 recipe: 10).
        pct: the fraction of the run spent in the final annealing phase (CIFAR-10 recipe: 0.075).
        final_div_factor: the final lr is ``max lr / (div_factor * final_div_factor)`` (fastai 2018: 100).
        base_momentum: momentum at the lr peak (0.85).
        max_momentum: momentum at the start and in the last phase (0.95).
    """

    def __init__(
        self,
        div_factor: float = 10.0,
        pct: float = 0.075,
        final_div_factor: float = 100.0,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
    ) -> None:
        if not 0.0 < pct < 1.0:
            raise ValueError(f"pct (the final annealing fraction) must lie in (0, 1), got {pct}.")
        self.pct = pct
        super().__init__(
            pct_start=(1.0 - pct) / 2,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            anneal="linear",
            three_phase=True,
            base_momentum=base_momentum,
            max_momentum=max_momentum,
        )


class OneCycleLM(Schedule):
    """The four-phase language-model shape of the 2018 study (AWD-LSTM / QRNN on WikiText-2).

    Linear warm-up ``max/div -> max``, a plateau at ``max``, a linear cool-down ``max -> max/div``, then a cosine
    ``max/div -> 0``. Momentum (beta1) ``max -> base``, held at ``base``, ``base -> max``, then ``max``. Phase lengths
    are given in epochs (any unit): they are normalised to fractions of the run.

    Args:
        warmup: length of the warm-up (paper: 7.5 of 90 epochs).
        plateau: length of the plateau (37.5).
        cooldown: length of the cool-down (37.5).
        final: length of the final cosine (7.5).
        div_factor: lr ratio between the plateau and the warm-up start (10).
        base_momentum: beta1 on the plateau (0.7).
        max_momentum: beta1 at the start and the end (0.8).
    """

    def __init__(
        self,
        warmup: float = 7.5,
        plateau: float = 37.5,
        cooldown: float = 37.5,
        final: float = 7.5,
        div_factor: float = 10.0,
        base_momentum: float = 0.7,
        max_momentum: float = 0.8,
    ) -> None:
        lengths = [warmup, plateau, cooldown, final]
        if min(lengths) <= 0:
            raise ValueError(f"All four phase lengths must be positive, got {lengths}.")
        total = sum(lengths)
        f = [x / total for x in lengths]
        low, hi, lo = 1.0 / div_factor, max_momentum, base_momentum
        super().__init__(
            [
                Phase(f[0], (low, 1.0), (hi, lo), "linear"),
                Phase(f[1], (1.0, 1.0), (lo, lo), "constant"),
                Phase(f[2], (1.0, low), (lo, hi), "linear"),
                Phase(f[3], (low, 0.0), (hi, hi), "cos"),
            ]
        )


class Constant(Schedule):
    """The maximum lr throughout, momentum untouched: decoupled weight decay without a schedule."""

    def __init__(self) -> None:
        super().__init__([Phase(1.0, (1.0, 1.0), None, "constant")])
