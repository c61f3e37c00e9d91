"""``DivergenceGuard``: stop a diverging run with a message that says what to try, and never save bad weights."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class DivergenceError(RuntimeError):
    """The loss or the weights stopped being usable numbers; the message says where and what to try."""


def _lr_text(lr: float | None) -> str:
    return "unknown" if lr is None else f"{lr:.3g}"


def _what_to_try(lr: float | None) -> str:
    lower = f" (e.g. {lr / 3:.3g} instead of {lr:.3g})" if lr else ""
    return (
        f"Try a lower maximum lr{lower}, a larger div_factor for a gentler warm-up, gradient clipping "
        "(Trainer(gradient_clip_val=1.0); CLI: --trainer.gradient_clip_val 1.0), or bf16 instead of fp16; check the "
        "data for NaN/inf values. The last good checkpoint is untouched: resume from it with "
        "trainer.fit(model, ckpt_path=...) (CLI: --ckpt_path ...)."
    )


class DivergenceGuard(Callback):
    """Stops training when the loss is not finite or grows far above where it started.

    The reference is the mean training loss of the first ``warmup_steps`` training batches; once the loss exceeds
    ``max_ratio`` times that reference (or is NaN/inf at any step) the run stops with :class:`DivergenceError`
    naming the step, the learning rate and what to try. A checkpoint whose weights are not all finite is refused,
    so neither ``last.ckpt`` nor the best checkpoint ever holds NaN/inf weights.

    Args:
        max_ratio: stop when ``loss > max_ratio * reference``; ``None`` checks only for NaN/inf.
        warmup_steps: training batches averaged into the reference loss.
        check_every_n_steps: read the loss on every n-th optimizer step only (reading it waits for the GPU).

    Example::

        Trainer(callbacks=[OneCycleWD(), DivergenceGuard(max_ratio=10)])
    """

    def __init__(self, max_ratio: float | None = 20.0, warmup_steps: int = 20, check_every_n_steps: int = 1) -> None:
        super().__init__()
        if max_ratio is not None and max_ratio <= 1:
            raise ValueError(f"max_ratio must be > 1 (a multiple of the starting loss), got {max_ratio}.")
        if warmup_steps < 1 or check_every_n_steps < 1:
            raise ValueError("warmup_steps and check_every_n_steps must be >= 1.")
        self.max_ratio = max_ratio
        self.warmup_steps = warmup_steps
        self.check_every_n_steps = check_every_n_steps
        self._warmup_losses: list[float] = []
        self.reference: float | None = None
        self._step = 0

    @staticmethod
    def _lr(trainer: pl.Trainer) -> float | None:
        return trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step = trainer.global_step  # the optimizer step this batch belongs to

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        step = self._step
        if not isinstance(loss, torch.Tensor) or step % self.check_every_n_steps:
            return
        value = float(loss.detach())
        lr = self._lr(trainer)
        if not math.isfinite(value):
            raise DivergenceError(
                f"The training loss is {value} at step {step} (epoch {trainer.current_epoch}, "
                f"lr {_lr_text(lr)}). {_what_to_try(lr)}"
            )
        if self.reference is None:
            self._warmup_losses.append(value)
            if len(self._warmup_losses) >= self.warmup_steps:
                self.reference = sum(self._warmup_losses) / len(self._warmup_losses)
            return
        if self.max_ratio is not None and value > self.max_ratio * self.reference:
            raise DivergenceError(
                f"The training loss diverged: {value:.4g} at step {step} (epoch "
                f"{trainer.current_epoch}, lr {_lr_text(lr)}) is more than {self.max_ratio:g}x its starting value "
                f"{self.reference:.4g}. {_what_to_try(lr)}"
            )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise DivergenceError(
                f"Refusing to save a checkpoint at step {trainer.global_step}: {len(bad)} weight tensors hold NaN/inf "
                f"(e.g. {bad[:3]}). {_what_to_try(self._lr(trainer))}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "warmup_losses": list(self._warmup_losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")
        self._warmup_losses = list(state_dict.get("warmup_losses", []))
