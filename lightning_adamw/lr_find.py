"""The learning-rate range test: Lightning's ``Tuner.lr_find`` with its smoothed loss debiased, and fastai's
suggestion rules beside Lightning's steepest slope.

Lightning's finder smooths the loss as fastai does (``avg <- beta * avg + (1 - beta) * loss``, ``beta = 0.98``) but
divides by ``1 - beta ** (global_step + 1)`` where ``global_step`` is already 1 at the first batch, so its first
points are about half the loss (``loss / (1 + beta)``) and the curve climbs from the left. :func:`debiased`
recovers the running average from those points and divides by ``1 - beta ** n`` with ``n`` the losses averaged.

Example::

    from lightning_adamw.lr_find import lr_find
    result = lr_find(trainer, model, datamodule=data, min_lr=1e-6, max_lr=1.0)
    print(result.suggestions)  # {'steepest': ..., 'valley': ..., 'minimum/10': ..., 'steep': ...}
    result.plot("lr_find.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.tuner import Tuner

#: The smoothing of Lightning's finder (``_LRCallback(beta=0.98)``, fastai's value too).
SMOOTHING = 0.98


def debiased(
    smoothed: Sequence[float], start_step: int = 0, beta: float = SMOOTHING
) -> tuple[list[float], list[float]]:
    """``(debiased smoothed losses, raw losses)`` from Lightning's finder curve.

    Point ``k`` was recorded at ``global_step = start_step + k + 1`` and divided by ``1 - beta ** (global_step + 1)``;
    NaN points (a step without a loss) did not enter the average and stay NaN.
    """
    out: list[float] = []
    raw: list[float] = []
    avg, n = 0.0, 0
    for k, value in enumerate(smoothed):
        if math.isnan(value):
            out.append(math.nan)
            raw.append(math.nan)
            continue
        new_avg = value * (1.0 - beta ** (start_step + k + 2))
        raw.append((new_avg - beta * avg) / (1.0 - beta))
        avg, n = new_avg, n + 1
        out.append(avg / (1.0 - beta**n))
    return out, raw


def steepest(lrs: Sequence[float], losses: Sequence[float], skip_begin: int = 10, skip_end: int = 1) -> int | None:
    """Lightning's rule (``_LRFinder.suggestion``): the most negative ``d loss / d lr`` (``torch.gradient``)."""
    index = torch.arange(len(losses))[skip_begin:-skip_end]
    x, y = torch.tensor(lrs)[skip_begin:-skip_end], torch.tensor(losses)[skip_begin:-skip_end]
    finite = torch.isfinite(y)
    if int(finite.sum()) < 2:
        return None
    gradient = torch.gradient(y[finite], spacing=[x[finite]])[0]
    return int(index[finite][torch.argmin(gradient)])


def _fastai_window(losses: Sequence[float]) -> range:
    # fastai's Learner.lr_find: drop the first tenth and the last 5 points, and everything from the first NaN on
    stop = len(losses) - 5
    start = len(losses) // 10
    nan = next((i for i in range(start, stop) if not math.isfinite(losses[i])), stop)
    return range(start, nan)


def valley(lrs: Sequence[float], losses: Sequence[float]) -> int | None:
    """fastai's default rule (``valley``, from ESRI): about two thirds down the longest valley.

    The valley is the longest strictly decreasing subsequence of the losses, taken from the first point where the
    longest one ends back by its length; the suggestion sits ``int(L/3) + int(L/6)`` points into it. ``None`` where
    the loss never fell.
    """
    window = _fastai_window(losses)
    y = [losses[i] for i in window]
    if len(y) < 2:
        return None
    longest = [1] * len(y)
    end = 0
    for i in range(1, len(y)):
        longest[i] = 1 + max((longest[j] for j in range(i) if y[j] > y[i]), default=0)
        if longest[i] > longest[end]:
            end = i
    if longest[end] < 2:
        return None  # the loss never fell
    start = end - longest[end]
    section = (end - start) / 3
    return window[start + int(section) + int(section / 2)]


def minimum(lrs: Sequence[float], losses: Sequence[float]) -> int | None:
    """fastai's ``minimum`` rule: the point of lowest loss (the suggestion is a tenth of its lr)."""
    window = _fastai_window(losses)
    return min(window, key=lambda i: losses[i]) if window else None


def steep(lrs: Sequence[float], losses: Sequence[float]) -> int | None:
    """fastai's ``steep`` rule: the most negative forward difference of the loss against ``log(lr)``."""
    window = _fastai_window(losses)
    if len(window) < 2:
        return None
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in window[:-1]]
    return window[min(range(len(slopes)), key=slopes.__getitem__)]


#: name -> (rule, factor applied to the lr of the point the rule picks)
RULES = {"steepest": (steepest, 1.0), "valley": (valley, 1.0), "minimum/10": (minimum, 0.1), "steep": (steep, 1.0)}
_ABOUT = {"steepest": "Lightning's steepest slope", "valley": "fastai's default", "minimum/10": "fastai",
          "steep": "fastai, against log lr"}


@dataclass
class LRFindResult:
    """The range test's curve and suggestions.

    Attributes:
        lrs: the lr of each step.
        losses: the smoothed loss, debiased (its first point is the first loss).
        raw_losses: the loss of each step.
        suggestions: rule name -> ``(suggested lr, the point marked: (lr, loss))``, ``None`` where a rule found
            too few points.
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    suggestions: dict[str, tuple[float, tuple[float, float]] | None] = field(default_factory=dict)
    title: str = "lr range test"

    def report(self) -> str:
        """One line per suggestion."""
        lines = []
        for name, found in self.suggestions.items():
            shown = "none (too few finite points: widen the lr range or take more steps)" if found is None \
                else f"{found[0]:.3g}"
            lines.append(f"  {name:<11} {shown}  ({_ABOUT.get(name, name)})")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Save the loss-vs-lr plot with each suggestion marked and labelled with its value; returns the path."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("The lr_find plot needs matplotlib: pip install matplotlib") from None
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(self.lrs, self.raw_losses, color="0.75", linewidth=0.8, label="loss")
        ax.plot(self.lrs, self.losses, color="C0", label=f"smoothed (beta {SMOOTHING}, debiased)")
        for color, (name, found) in enumerate(self.suggestions.items(), start=1):
            if found is not None:
                lr, (x, y) = found
                ax.plot(x, y, "o", markersize=8, color=f"C{color}", label=f"{name}: {lr:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title(self.title)
        ax.legend(loc="best")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path


def suggest(lrs: Sequence[float], losses: Sequence[float]) -> dict[str, tuple[float, tuple[float, float]] | None]:
    """Every rule of :data:`RULES` on a (debiased) curve."""
    out: dict[str, tuple[float, tuple[float, float]] | None] = {}
    for name, (rule, factor) in RULES.items():
        index = rule(lrs, losses)
        out[name] = None if index is None else (lrs[index] * factor, (lrs[index], losses[index]))
    return out


def lr_find(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_training: int = 100,
    mode: Literal["exponential", "linear"] = "exponential",
    early_stop_threshold: float | None = 4.0,
    **tuner_kwargs: Any,
) -> LRFindResult | None:
    """Run ``Tuner(trainer).lr_find`` and return its curve debiased, with every rule's suggestion.

    The weights and optimizer state are restored afterwards (Lightning's finder does that). Optimizers built by the
    registry in decoupled mode keep their decay during the test, at the finder's lr. Lightning's early stop still
    compares its biased curve with its biased best loss, which starts at about half the first loss: until the loss has
    fallen below that, the test stops at about ``early_stop_threshold / 2`` times the first loss.
    Returns ``None`` where Lightning skips the test (``fast_dev_run``).
    """
    start = trainer.global_step
    finder = Tuner(trainer).lr_find(
        model, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr, num_training=num_training, mode=mode,
        early_stop_threshold=early_stop_threshold, update_attr=False, **tuner_kwargs,
    )
    if finder is None:
        return None
    lrs = [float(x) for x in finder.results["lr"]]
    losses, raw = debiased([float(x) for x in finder.results["loss"]], start)
    finder.results["loss"] = losses  # so finder.plot() and finder.suggestion() see the debiased curve too
    title = f"lr range test: {type(model).__name__}, {len(lrs)} steps, {mode} {min_lr:g} to {max_lr:g}"
    return LRFindResult(lrs, losses, raw, suggest(lrs, losses), title)
