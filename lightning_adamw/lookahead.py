"""``Lookahead``: slow weights that follow the trained ones, with the decay airbench94 schedules over the run.

Lookahead (M. Zhang, J. Lucas, G. Hinton, J. Ba, "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019)
keeps a second, slow copy of the weights. Every ``every`` optimizer steps the slow copy moves part of the way towards
the trained (fast) weights and the fast weights restart from it::

    slow <- decay_t * slow + (1 - decay_t) * fast;   fast <- slow

airbench94 (K. Jordan, arXiv:2404.00498) schedules the decay over the run, ``decay_t = decay * (t / T) ** power``
with ``decay = 0.95 ** 5``, ``power = 3``, ``every = 5`` (``t`` the optimizer step, ``T`` the run's last): nearly no
averaging early, when the weights move fast, and a strong average at the end. On the last step the fast weights take
the slow ones (``decay_t = 1``), so the network that is evaluated and saved is the average. BatchNorm's running
statistics are averaged with the weights (airbench averages every floating-point entry of the ``state_dict``).

Written here rather than taken from a library: ``torch.optim.swa_utils.AveragedModel`` keeps the average in a
separate model and never writes it back, and optimizer wrappers (``pytorch_optimizer.Lookahead``) use a constant
decay, leave the BatchNorm statistics alone and would stand between ``OneCycleWD`` and the optimizer it schedules.

Example::

    trainer = Trainer(max_epochs=10, callbacks=[OneCycleWD(...), Lookahead()])   # airbench94's values
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

#: airbench94's values: a sync every 5 steps, the decay 0.95 per step over those 5, grown with the cube of progress.
EVERY = 5
DECAY = 0.95**5
POWER = 3.0


class Lookahead(pl.Callback):
    """Lookahead with a decay that grows over the run, the fast weights set to the slow ones at the end.

    Args:
        every: optimizer steps between two syncs of the slow and fast weights (airbench94: 5).
        decay: the slow weights' share at the end of the run, ``decay_t = decay * (t / T) ** power``
            (airbench94: ``0.95 ** 5``).
        power: how the decay grows with the run's progress ``t / T`` (airbench94: 3; 0 keeps it constant, which is
            the original Lookahead with ``alpha = 1 - decay``).

    ``T`` is ``trainer.estimated_stepping_batches``, so the run needs ``max_epochs`` or ``max_steps``. The slow
    weights are kept in this callback's state, so a run resumed from a checkpoint continues exactly.
    """

    def __init__(self, every: int = EVERY, decay: float = DECAY, power: float = POWER) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"Lookahead every must be >= 1 optimizer step, got {every}.")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"Lookahead decay must lie in [0, 1) (the slow weights' share at a sync), got {decay}.")
        if power < 0:
            raise ValueError(f"Lookahead power must be >= 0, got {power}.")
        self.every = every
        self.decay = decay
        self.power = power
        self._slow: dict[str, torch.Tensor] | None = None
        self._total = 0
        self._last_step = -1

    def decay_at(self, step: int) -> float:
        """``decay_t`` at optimizer step ``step`` of the run's ``T``."""
        return self.decay * (step / self._total) ** self.power

    def _averaged(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        # the module's floating-point state: parameters and BatchNorm statistics (counters stay the module's own)
        return {name: t for name, t in pl_module.state_dict().items() if t.is_floating_point()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise MisconfigurationException(
                "Lookahead schedules its decay over the run, which has no end: set Trainer(max_epochs=...) or "
                "max_steps."
            )
        self._total = max(int(total), 1)
        fast = self._averaged(pl_module)
        if self._slow is None:  # a fresh run (a resumed one has the checkpoint's slow weights)
            self._slow = {name: t.detach().clone() for name, t in fast.items()}
        elif set(self._slow) != set(fast):
            raise MisconfigurationException(
                "The checkpoint's Lookahead state holds other tensors than this model has "
                f"({len(self._slow)} vs {len(fast)}): resume with the model the checkpoint was written with."
            )
        else:
            self._slow = {name: t.to(fast[name].device, fast[name].dtype) for name, t in self._slow.items()}
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or self._slow is None:
            return  # no optimizer step in this batch (gradient accumulation, or a skipped fp16 step)
        self._last_step = step
        final = step >= self._total
        if step % self.every and not final:
            return
        # at the last step: the sync due there (airbench94 runs it, then copies the slow weights into the fast ones,
        # which it has just done), or with none due, the copy alone (decay 1: the slow weights unchanged)
        decay = self.decay_at(step) if step % self.every == 0 else 1.0
        with torch.no_grad():
            for name, fast in self._averaged(pl_module).items():
                slow = self._slow[name]
                slow.lerp_(fast, 1.0 - decay)
                fast.copy_(slow)

    def state_dict(self) -> dict[str, Any]:
        return {} if self._slow is None else {"slow": {k: v.clone() for k, v in self._slow.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._slow = state_dict.get("slow")
