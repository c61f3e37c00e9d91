"""``OneCycleWD``: the 1cycle lr + momentum schedule and decoupled weight decay, for any torch optimizer."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_adamw.decay import (
    DECOUPLED_WD_KEY,
    DecoupledDecay,
    DecoupledWeightDecay,
    is_schedule_free,
    unwrap_optimizer,
)
from lightning_adamw.lognames import group_metric_name
from lightning_adamw.registry import LAYER_GROUP_KEY
from lightning_adamw.schedules import OneCycle, Schedule


class OneCycleWD(Callback):
    r"""1cycle learning rate and momentum schedule with decoupled weight decay, per optimizer step.

    At every optimizer step (in ``on_before_optimizer_step``: after backward, before Lightning clips the gradients and
    before ``optimizer.step``) the callback

    1. sets each parameter group's lr to ``max_lr_g * schedule(step)`` and the momentum (SGD ``momentum`` or Adam
       ``betas[0]``) to the schedule's value,
    2. drives the optimizer's decoupled weight decay (:class:`~lightning_adamw.decay.DecoupledWeightDecay`, which
       applies it inside ``optimizer.step``): ``w <- w - lr_t * wd * w`` on the group's parameters that have a
       gradient (the convention of ``torch.optim.AdamW`` and fastai), or ``w <- w - eta_t * wd * w`` with ``eta_t``
       the schedule multiplier (``wd_convention="schedule"``, as written in the AdamW paper); nothing is decayed on
       a step that fp16 mixed precision skips,
    3. logs ``lr``, ``momentum`` and ``wd`` to every logger; with several parameter groups the names are
       ``lr/pg0``, ``lr/pg1``, ...; a group whose parameters are all frozen is logged at lr 0 (and wd 0). ``wd`` is
       not the configured weight decay but the factor the step applied, ``w <- (1 - wd) * w``: ``lr_t * wd_g``
       (``eta_t * wd_g`` under ``wd_convention="schedule"``, times ``sqrt(1 / total_steps)`` when ``normalized``),
       0 on a step fp16 skipped; a group without decoupled decay logs no ``wd``. Lightning writes these every
       ``log_every_n_steps`` steps: a run shorter than that logs none (a warning says so).

    The step count is ``trainer.global_step`` (optimizer steps), so gradient accumulation, several devices and
    resuming all follow the same curve. The total is ``trainer.estimated_stepping_batches`` unless given.

    Args:
        schedule: the shape (:mod:`lightning_adamw.schedules`); default PyTorch's ``OneCycleLR`` shape.
        max_lr: the peak lr, one value or one per parameter group; ``None`` takes each group's lr from the optimizer
            (so discriminative lrs scale together).
        total_steps: optimizer steps in the run; ``None`` asks the trainer.
        weight_decay: decoupled decay for groups that do not say their own; ``None`` applies only what groups carry
            in ``decoupled_wd`` (set by :func:`~lightning_adamw.build_optimizer` in decoupled mode).
        wd_convention: ``"lr"``: decay ``lr_t * wd``; ``"schedule"``: decay ``eta_t * wd`` (paper).
        normalized: treat the weight decay as the AdamW paper's normalised ``lambda_norm`` and use
            ``lambda_norm * sqrt(b / (B * T))``; ``B * T / b`` is the number of optimizer steps of the run.
        log_values: log lr, momentum and weight decay.
        weight_decay_timescale: set the decoupled decay by its timescale instead, in epochs: the weights are an
            exponential moving average of the updates over ``tau = 1 / (lr * wd)`` optimizer steps (Wang & Aitchison
            2024, arXiv:2405.13698, who find the best ``tau`` in epochs stable across model and data size), so each
            group gets ``wd = 1 / (max_lr_g * weight_decay_timescale * steps_per_epoch)`` (``max_lr_g`` read as 1
            under ``wd_convention="schedule"``). Every group is decayed; one that carries its own decay is refused.
            The chosen values are printed and logged as ``weight_decay`` (``weight_decay/pg0``, ...).

    A module attribute ``lr_scale`` (float), when present, multiplies the lr of the current step (AWD-LSTM scales the
    lr by ``seq_len / bptt``); the decay in the ``"lr"`` convention uses the scaled lr.

    Example::

        from lightning_adamw import OneCycleWD, OneCycle2018
        trainer = Trainer(max_epochs=30, callbacks=[OneCycleWD(OneCycle2018(div_factor=10, pct=0.075),
                                                               weight_decay=0.1)])
        # configure_optimizers: torch.optim.Adam(self.parameters(), lr=3e-3, betas=(0.95, 0.99))
    """

    def __init__(
        self,
        schedule: Schedule | None = None,
        max_lr: float | list[float] | None = None,
        total_steps: int | None = None,
        weight_decay: float | None = None,
        wd_convention: Literal["lr", "schedule"] = "lr",
        normalized: bool = False,
        log_values: bool = True,
        weight_decay_timescale: float | None = None,
    ) -> None:
        super().__init__()
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a lightning_adamw.Schedule (e.g. OneCycle()), got {schedule!r}.")
        max_lrs = [max_lr] if isinstance(max_lr, (int, float)) else list(max_lr or [])
        if any(x <= 0 for x in max_lrs):
            raise ValueError(f"max_lr must be positive, got {max_lr}.")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be a positive number of optimizer steps, got {total_steps}.")
        if weight_decay is not None and weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        if wd_convention not in ("lr", "schedule"):
            raise ValueError(
                f"wd_convention must be 'lr' (lr_t * wd) or 'schedule' (eta_t * wd), got {wd_convention!r}."
            )
        if weight_decay_timescale is not None:
            if weight_decay_timescale <= 0:
                raise ValueError(f"weight_decay_timescale must be a positive number of epochs, got "
                                 f"{weight_decay_timescale}.")
            if weight_decay is not None or normalized:
                raise ValueError(
                    "weight_decay_timescale sets the weight decay itself: drop "
                    + ("weight_decay" if weight_decay is not None else "normalized=True")
                    + " (or drop weight_decay_timescale to give the decay directly)."
                )
        self.weight_decay_timescale = weight_decay_timescale
        self._steps_per_epoch: int | None = None
        self.schedule = schedule if schedule is not None else OneCycle()
        self.max_lr = max_lr
        self.total_steps = total_steps
        self.weight_decay = weight_decay
        self.wd_convention = wd_convention
        self.normalized = normalized
        self.log_values = log_values
        self._total: int | None = None
        # per optimizer: list of cycles {"start": step, "max_lrs": [...]}
        self._cycles: dict[int, list[dict[str, Any]]] = {}
        self._decays: dict[int, DecoupledWeightDecay] = {}  # the optimizers whose decay this callback drives
        self._etas: dict[int, float] = {}  # the schedule multiplier of the current step (wd_convention="schedule")
        self._stepping: set[int] = set()
        self._boundaries: list[int] = []
        self._restored_total: int | None = None
        self._warned: set[str] = set()

    # ---------------------------------------------------------------- public helpers for other callbacks
    def plan_cycle_boundaries(self, steps: Sequence[int]) -> None:
        """Declare the steps at which new cycles will start (fine-tuning's unfreeze), so earlier cycles end there."""
        self._boundaries = sorted({int(s) for s in steps if s > 0})

    def start_cycle(self, trainer: pl.Trainer, max_lr: Sequence[float] | None = None, optimizer_idx: int = 0) -> None:
        """Start a fresh cycle now (``trainer.global_step``), with new peak lrs.

        Args:
            max_lr: one lr per layer group (matched through the groups' ``layer_group`` key) or per parameter group;
                ``None`` keeps the previous cycle's peaks.
        """
        step = trainer.global_step
        cycles = self._cycles.setdefault(optimizer_idx, [])
        if any(c["start"] == step for c in cycles):
            return  # already started (a resumed run re-enters the same epoch)
        optimizer = unwrap_optimizer(trainer.optimizers[optimizer_idx])
        if max_lr is None:
            if not cycles:
                raise RuntimeError("start_cycle(max_lr=None) needs an earlier cycle to take its peak lrs from.")
            lrs = list(cycles[-1]["max_lrs"])
            lrs += [g["lr"] for g in optimizer.param_groups[len(lrs):]]
        else:
            lrs = self._per_group(optimizer, list(max_lr), what="max_lr")
        cycles.append({"start": step, "max_lrs": lrs})
        self._boundaries = sorted(set(self._boundaries) | {step}) if step > 0 else self._boundaries

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _per_group(optimizer: Optimizer, values: list[float], what: str) -> list[float]:
        groups = optimizer.param_groups
        if len(values) == 1:
            return values * len(groups)
        if len(values) == len(groups):
            return values
        layer_ids = [g.get(LAYER_GROUP_KEY) for g in groups]
        if None not in layer_ids and max(layer_ids) + 1 == len(values):
            return [values[i] for i in layer_ids]
        raise ValueError(
            f"{what} has {len(values)} values but the optimizer has {len(groups)} parameter groups"
            + (f" ({max(layer_ids) + 1} layer groups)" if None not in layer_ids else "")
            + ": give one value, one per layer group, or one per parameter group."
        )

    def _resolve_total(self, trainer: pl.Trainer) -> int:
        if self.total_steps is not None:
            return self.total_steps
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise MisconfigurationException(
                "OneCycleWD needs the run length: set Trainer(max_epochs=...) or max_steps, or pass "
                "OneCycleWD(total_steps=...)."
            )
        return int(total)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before any callback's on_train_start, so the pair is refused with one message whatever the order
        other = next((c for c in trainer.callbacks if isinstance(c, DecoupledDecay)), None)
        decayed = [type(o).__name__ for o in map(unwrap_optimizer, trainer.optimizers) if self._has_decay(o)]
        if other is not None and decayed:
            source = (f"its weight_decay={self.weight_decay}" if self.weight_decay
                      else "its weight_decay_timescale" if self.weight_decay_timescale is not None
                      else "the groups' decoupled_wd")
            raise MisconfigurationException(
                f"OneCycleWD applies the decoupled weight decay of {', '.join(decayed)} ({source}) and DecoupledDecay "
                "would apply it as well: decay must happen once. Remove DecoupledDecay: OneCycleWD decays with its "
                "schedule (DecoupledDecay is for runs with another lr scheduler)."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = self._resolve_total(trainer)
        if self._restored_total is not None and self._restored_total != total:
            raise MisconfigurationException(
                f"This run was checkpointed with a {self._restored_total}-step OneCycleWD cycle but now has {total} "
                "optimizer steps (max_epochs, max_steps, batch size, devices or accumulate_grad_batches changed). "
                "Resume with the original settings, pass OneCycleWD(total_steps="
                f"{self._restored_total}) to keep the old schedule, or start a new run without ckpt_path "
                "(CLI: --ckpt_path)."
            )
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        for config in trainer.lr_scheduler_configs:
            if unwrap_optimizer(config.scheduler.optimizer) in optimizers:
                raise MisconfigurationException(
                    f"configure_optimizers returned the lr scheduler {type(config.scheduler).__name__} and OneCycleWD "
                    "also schedules that optimizer: two owners of the lr would fight. Return only the optimizer "
                    "from configure_optimizers and let OneCycleWD schedule it."
                )
        steps_per_epoch = None
        if self.weight_decay_timescale is not None:
            if not math.isfinite(trainer.num_training_batches):
                raise MisconfigurationException(
                    "OneCycleWD(weight_decay_timescale=...) counts the timescale in epochs and needs the number of "
                    "training batches per epoch, which this dataloader does not have (no __len__): give "
                    "weight_decay instead."
                )
            steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        self.attach(optimizers, total, steps_per_epoch)
        if self.weight_decay_timescale is not None:
            for idx in self._decays:
                wds = self._group_decays(idx)
                metrics = {group_metric_name("weight_decay", g, len(wds), idx, len(optimizers)): wd
                           for g, wd in enumerate(wds)}
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)
        # Lightning writes on_step metrics every log_every_n_steps optimizer steps: a shorter run logs no curve
        if self.log_values and trainer.loggers and total < trainer.log_every_n_steps:
            self._warn_once(
                "nolog",
                f"Trainer(log_every_n_steps={trainer.log_every_n_steps}) is more than this run's {total} optimizer "
                "steps: the loggers will receive no lr/momentum/wd values. Set log_every_n_steps to at most "
                f"{total} (CLI: --trainer.log_every_n_steps 1) to see the schedule.",
            )

    def attach(self, optimizers: Sequence[Optimizer], total_steps: int, steps_per_epoch: int | None = None) -> None:
        """Take charge of ``optimizers`` for a run of ``total_steps`` optimizer steps.

        The Trainer hooks call this; a hand-written loop calls it once, then :meth:`apply` before each step.
        ``steps_per_epoch`` (optimizer steps) is needed with ``weight_decay_timescale``.
        """
        if self.weight_decay_timescale is not None and not steps_per_epoch:
            raise ValueError("OneCycleWD(weight_decay_timescale=...) needs attach(..., steps_per_epoch=...).")
        self._total = int(total_steps)
        self._steps_per_epoch = steps_per_epoch
        for idx, optimizer in enumerate(optimizers):
            if is_schedule_free(optimizer):
                raise MisconfigurationException(
                    f"{type(optimizer).__name__} is schedule-free (it has train()/eval() weights): it needs no "
                    "decaying lr schedule and applies its own weight decay. Replace OneCycleWD with "
                    "lightning_adamw.ScheduleFreeEval(warmup=0.05), which warms it up and evaluates and saves its "
                    "averaged weights."
                )
            if self.schedule.cycles_momentum and not any(
                k in optimizer.param_groups[0] for k in ("betas", "momentum")
            ):
                self._warn_once(
                    f"nomom{idx}",
                    f"{type(optimizer).__name__} has neither `momentum` nor `betas`: OneCycleWD schedules only its lr.",
                )
            if not self._cycles.get(idx):
                lrs = [g["lr"] for g in optimizer.param_groups] if self.max_lr is None else self._per_group(
                    optimizer, [self.max_lr] if isinstance(self.max_lr, (int, float)) else list(self.max_lr), "max_lr"
                )
                self._cycles[idx] = [{"start": 0, "max_lrs": [float(x) for x in lrs]}]
            self._claim_decay(idx, optimizer)
            if self.weight_decay_timescale is not None:
                peaks = self._cycles[idx][0]["max_lrs"]
                rank_zero_info(
                    f"OneCycleWD: weight_decay_timescale {self.weight_decay_timescale:g} epochs x "
                    f"{steps_per_epoch} steps/epoch at max lr {', '.join(f'{p:g}' for p in peaks)}: weight_decay "
                    f"{', '.join(f'{wd:.4g}' for wd in self._group_decays(idx))}"
                )

    def _timescale_wd(self, idx: int, g: int, group: dict[str, Any]) -> float:
        """The decay ``weight_decay_timescale`` sets for group ``g``; a group that carries its own is refused."""
        own = group.get(DECOUPLED_WD_KEY) or group.get("weight_decay")
        if own:
            raise MisconfigurationException(
                f"OneCycleWD(weight_decay_timescale={self.weight_decay_timescale:g}) sets the weight decay, but a "
                f"parameter group already carries weight decay {own} (the optimizer's weight_decay): set that to 0 "
                "(e.g. optimizer weight_decay: 0) or drop weight_decay_timescale."
            )
        assert self._steps_per_epoch is not None and self.weight_decay_timescale is not None
        peak = self._cycles[idx][0]["max_lrs"][g] if self.wd_convention == "lr" else 1.0
        return 1.0 / (peak * self.weight_decay_timescale * self._steps_per_epoch)

    def _has_decay(self, optimizer: Optimizer) -> bool:
        """Whether there is a decoupled decay for this callback to drive (a group's ``decoupled_wd``, or ours)."""
        return (bool(self.weight_decay) or self.weight_decay_timescale is not None
                or any(g.get(DECOUPLED_WD_KEY, 0.0) for g in optimizer.param_groups))

    def _claim_decay(self, idx: int, optimizer: Optimizer) -> None:
        """Drive the optimizer's decoupled decay when there is one."""
        if not self._has_decay(optimizer):
            return  # nothing to decay: OneCycleWD only schedules (an optimizer's own weight_decay stays its own)
        plain = self.wd_convention == "lr" and not self.normalized  # the decay's default rate: the group's lr
        decay = DecoupledWeightDecay.attach(optimizer)
        rate = None if plain else functools.partial(self._decay_rate, idx)
        if self.weight_decay_timescale is None:
            decay.claim(self, self.weight_decay, rate)
        else:
            decay.claim(self, rate=rate, decide=functools.partial(self._timescale_wd, idx))
        self._decays[idx] = decay

    def _decay_rate(self, idx: int, group: dict[str, Any]) -> float:
        """What multiplies a group's ``wd`` at this step: ``lr_t`` or ``eta_t``, normalised when asked."""
        norm = math.sqrt(1.0 / self._total) if self.normalized else 1.0
        return (float(group["lr"]) if self.wd_convention == "lr" else self._etas[idx]) * norm

    def _group_decays(self, idx: int) -> list[float]:
        decay = self._decays.get(idx)
        return decay.group_decays() if decay is not None else [0.0] * len(self._cycles[idx][0]["max_lrs"])

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # ---------------------------------------------------------------- the step
    def _schedule_at(self, step: int, optimizer_idx: int) -> tuple[float, float | None, list[float]]:
        """``(lr multiplier, momentum, peak lrs)`` of the cycle that ``step`` belongs to."""
        if self._total is None:
            raise RuntimeError("OneCycleWD.values() is available once training has started.")
        cycles = self._cycles[optimizer_idx]
        cycle = max((c for c in cycles if c["start"] <= step), key=lambda c: c["start"])
        end = min([b for b in self._boundaries if b > cycle["start"]] + [self._total])
        mult, momentum = self.schedule(step - cycle["start"], end - cycle["start"])
        return mult, momentum, cycle["max_lrs"]

    def values(self, step: int, optimizer_idx: int = 0) -> tuple[list[float], float | None, list[float]]:
        """``(lrs per group, momentum, decay factor per group)`` the callback uses at ``step`` (no ``lr_scale``)."""
        mult, momentum, max_lrs = self._schedule_at(step, optimizer_idx)
        lrs = [m * mult for m in max_lrs]
        norm = math.sqrt(1.0 / self._total) if self.normalized else 1.0
        wds = self._group_decays(optimizer_idx)
        if self.wd_convention == "lr":
            decay = [lr * wd * norm for lr, wd in zip(lrs, wds)]
        else:
            decay = [mult * wd * norm for wd in wds]
        return lrs, momentum, decay

    def _sync_groups(self, idx: int, optimizer: Optimizer) -> None:
        # parameter groups added after the start (e.g. by a BaseFinetuning callback) take their lr as peak
        for cycle in self._cycles[idx]:
            cycle["max_lrs"] += [float(g["lr"]) for g in optimizer.param_groups[len(cycle["max_lrs"]):]]

    def apply(
        self,
        optimizer: Optimizer,
        step: int,
        optimizer_idx: int = 0,
        lr_scale: float = 1.0,
    ) -> tuple[list[float], float | None, list[float]]:
        """Set lr and momentum for ``step`` (and the decay the next ``optimizer.step()`` applies); call after
        backward, before the step.

        Returns ``(lrs, momentum, decay factors)`` for this step.
        """
        self._sync_groups(optimizer_idx, optimizer)
        if step >= self._total:
            self._warn_once("overrun", f"Training ran past OneCycleWD's {self._total} steps; the last values are kept.")
        lrs, momentum, decay = self.values(step, optimizer_idx)
        if lr_scale != 1.0:
            lrs = [lr * lr_scale for lr in lrs]
            if self.wd_convention == "lr":
                decay = [d * lr_scale for d in decay]
        self._etas[optimizer_idx] = self._schedule_at(step, optimizer_idx)[0]  # the decay's rate in "schedule"
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
            if momentum is not None:
                if "betas" in group:
                    group["betas"] = (momentum, *tuple(group["betas"])[1:])
                elif "momentum" in group:
                    group["momentum"] = momentum
        return lrs, momentum, decay

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        optimizer = unwrap_optimizer(optimizer)
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        idx = next(i for i, o in enumerate(optimizers) if o is optimizer)
        lrs, momentum, _ = self.apply(
            optimizer, trainer.global_step, optimizer_idx=idx, lr_scale=float(getattr(pl_module, "lr_scale", 1.0))
        )
        self._stepping.add(idx)
        if self.log_values:
            # a frozen group (no parameter trains, e.g. FreezeUnfreeze's body) is logged at lr 0, not as a cycle
            lrs = [lr if trains else 0.0 for lr, trains in zip(lrs, _trains(optimizer))]
            self._log(pl_module, idx, len(optimizers), lrs, momentum)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the decay is logged once the step has run: what was applied, 0 where fp16 skipped the step
        for idx in sorted(self._stepping):
            decay = self._decays.get(idx)
            if decay is not None and self.log_values:
                wds = decay.group_decays()
                applied = decay.pop_applied() or [0.0] * len(wds)
                for g, (factor, wd, trains) in enumerate(zip(applied, wds, _trains(decay.optimizer))):
                    if wd > 0:
                        name = group_metric_name("wd", g, len(wds), idx, len(trainer.optimizers))
                        pl_module.log(name, factor if trains else 0.0, on_step=True, on_epoch=False, prog_bar=False)
        self._stepping.clear()

    def _log(
        self, pl_module: pl.LightningModule, idx: int, n_optimizers: int, lrs: list[float], momentum: float | None
    ) -> None:
        for g, lr in enumerate(lrs):
            for key, value in (("lr", lr), ("momentum", momentum)):
                if value is not None:
                    name = group_metric_name(key, g, len(lrs), idx, n_optimizers)
                    pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=False)

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "total_steps": self._total,
            "cycles": {k: [dict(c, max_lrs=list(c["max_lrs"])) for c in v] for k, v in self._cycles.items()},
            "boundaries": list(self._boundaries),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_total = state_dict.get("total_steps")
        self._cycles = {int(k): [dict(c) for c in v] for k, v in state_dict.get("cycles", {}).items()}
        self._boundaries = list(state_dict.get("boundaries", []))


def _trains(optimizer: Optimizer) -> list[bool]:
    """Whether each parameter group has a parameter that trains (``requires_grad``)."""
    return [any(p.requires_grad for p in g["params"]) for g in optimizer.param_groups]
