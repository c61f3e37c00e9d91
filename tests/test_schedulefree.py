"""ScheduleFreeEval: train with y, evaluate and checkpoint x, resume exactly (oracle: eval() on a deep copy)."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _tiny import ShardedData, TinyData, TinyRegression, TinyResumableData, loader, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_adamw import OptimizerConfig, ScheduleFreeEval
from lightning_adamw.schedulefree import WeightSwap, update_bn

CONFIG = OptimizerConfig("schedulefree_adamw", lr=1e-2, weight_decay=1e-3)

pytestmark = pytest.mark.usefixtures("one_thread")


def flat(tensors: Any) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def eval_of_copy(net: nn.Module, *optimizers: torch.optim.Optimizer) -> torch.Tensor:
    """The averaged weights, from eval() on a deep copy of the network and its optimizers (the original untouched)."""
    net, *optimizers = copy.deepcopy((net, *optimizers))
    for optimizer in optimizers:
        if hasattr(optimizer, "eval"):
            optimizer.eval()
    return flat(net.parameters())


def modes(*optimizers: torch.optim.Optimizer) -> list[bool]:
    return [g["train_mode"] for o in optimizers for g in o.param_groups if "train_mode" in g]


class Probe(TinyRegression):
    """Records, for every step, the optimizer modes and how far the weights are from what they should be."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(CONFIG, seed=seed)
        self.seen: list[tuple[str, bool, list[bool], float]] = []
        self.saved: dict[int, dict[str, torch.Tensor]] = {}
        self.expected_eval: torch.Tensor | None = None
        self._after_step: torch.Tensor | None = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        optimizer = self.trainer.optimizers[0]
        self._after_step = flat(self.parameters()).clone()  # y after the step
        self.expected_eval = eval_of_copy(self.net, optimizer)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # y exactly as the last step left it, even across a validation in between
        gap = 0.0 if self._after_step is None else (flat(self.parameters()) - self._after_step).abs().max().item()
        self.seen.append(("train", self.trainer.sanity_checking, modes(self.trainer.optimizers[0]), gap))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        expected = flat(self.parameters()) if self.expected_eval is None else self.expected_eval
        gap = (flat(self.parameters()) - expected).abs().max().item()
        self.seen.append(("val", self.trainer.sanity_checking, modes(self.trainer.optimizers[0]), gap))
        super().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.seen.append(("test", False, [], (flat(self.parameters()) - self.expected_eval).abs().max().item()))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(("predict", False, [], (flat(self.parameters()) - self.expected_eval).abs().max().item()))
        return self(batch[0])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # module hooks run after the callbacks': the live weights must still be y
        optimizer = self.trainer.optimizers[0]
        net, opt = copy.deepcopy((self.net, optimizer))
        train = {f"net.{k}": v.clone() for k, v in net.state_dict().items()}
        opt.eval()
        self.saved[self.trainer.global_step] = {
            "train": train, "eval": {f"net.{k}": v.clone() for k, v in net.state_dict().items()}
        }


def fit(model: TinyRegression, epochs: int, tmp_path: Path | None = None, ckpt_path: str | Path | None = None,
        data: Any = None, **kwargs: Any) -> Any:
    callbacks = [ScheduleFreeEval(), *kwargs.pop("callbacks", [])]
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_last=True))
    kwargs.setdefault("enable_checkpointing", tmp_path is not None)
    tr = trainer(max_epochs=epochs, callbacks=callbacks, **kwargs)
    tr.fit(model, datamodule=data or TinyData(), ckpt_path=ckpt_path)
    return tr


def train_and_eval_weights(tr: Any, model: TinyRegression) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) after fit: the module holds x; train() on a copy gives y."""
    net, optimizer = copy.deepcopy((model.net, tr.optimizers[0]))
    optimizer.train()
    return flat(net.parameters()), flat(model.parameters()).clone()


# ---------------------------------------------------------------------------------------------------- 1. modes
def test_validation_sees_eval_weights_and_training_the_exact_train_weights() -> None:
    model = Probe()
    fit(model, 3, limit_val_batches=2, num_sanity_val_steps=2, val_check_interval=4)  # mid-epoch and at the end
    sanity = [s for s in model.seen if s[1]]
    val = [s for s in model.seen if s[0] == "val" and not s[1]]
    train = [s for s in model.seen if s[0] == "train"]
    assert len(sanity) == 2 and len(val) == 12 and len(train) == 24
    assert all(m == [False] for _, _, m, _ in sanity + val)
    assert all(m == [True] for _, _, m, _ in train)
    assert max(gap for *_, gap in val) < 1e-14
    assert max(gap for *_, gap in train) == 0.0  # put back, not recomputed by train()
    y, x = train_and_eval_weights(model.trainer, model)
    assert (x - y).abs().max() > 1e-3  # x and y really differ, so the checks above tell them apart


# ---------------------------------------------------------------------------------------------------- 2. checkpoints
def test_checkpoints_hold_eval_weights_and_saving_leaves_the_run_unchanged(tmp_path: Path) -> None:
    model = Probe()
    tr = fit(model, 3, tmp_path, limit_val_batches=2)
    assert sorted(model.saved) == [8, 16, 24]
    for step, expected in model.saved.items():
        ckpt = torch.load(tmp_path / f"epoch={step // 8 - 1}-step={step}.ckpt", weights_only=True)
        assert ckpt["state_dict"].keys() == expected["eval"].keys()
        for name, value in ckpt["state_dict"].items():
            torch.testing.assert_close(value, expected["eval"][name], rtol=1e-14, atol=1e-15)
        assert (flat(ckpt["state_dict"].values()) - flat(expected["train"].values())).abs().max() > 1e-4
        kept = flat(ckpt["callbacks"]["ScheduleFreeEval"]["train_weights"][0])
        assert torch.equal(kept, flat(expected["train"].values()))
    unsaved = Probe()
    tr_unsaved = fit(unsaved, 3, limit_val_batches=2)
    for a, b in zip(train_and_eval_weights(tr, model), train_and_eval_weights(tr_unsaved, unsaved)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- 3. resume
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """The group values (step, lr_max, weight_sum, train_mode, ...) and the state tensors (z, exp_avg_sq)."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return groups, [optimizer.state[p][k] for p in params for k in sorted(optimizer.state[p])]


@pytest.mark.parametrize("case", ["epoch_end", "validation", "mid_epoch", "after_fit_same_trainer"])
def test_resume_equals_an_uninterrupted_run(case: str, tmp_path: Path) -> None:
    kwargs: dict[str, Any] = dict(limit_val_batches=2) if case == "validation" else {}
    data = TinyResumableData() if case == "mid_epoch" else TinyData()
    full = Probe()
    tr_full = fit(full, 6, data=data, **kwargs)
    first = Probe()
    if case == "mid_epoch":
        every = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=12)
        fit(first, 2, data=TinyResumableData(), callbacks=[every], enable_checkpointing=True)
        ckpt: Path | str = tmp_path / "epoch=1-step=12.ckpt"
    else:
        tr_first = fit(first, 3, tmp_path, data=data, **kwargs)
        ckpt = tmp_path / "last.ckpt"
    resumed = Probe(seed=123)  # another initialisation: the weights must come from the checkpoint
    if case == "after_fit_same_trainer":
        ckpt = tmp_path / "after_fit.ckpt"
        tr_first.save_checkpoint(ckpt)  # written while the module holds x
        tr_first.fit_loop.max_epochs = 6
        tr_first.fit(resumed, datamodule=data, ckpt_path=ckpt)
        tr_resumed = tr_first
    else:
        tr_resumed = fit(resumed, 6, data=data, ckpt_path=ckpt, **kwargs)
    assert tr_resumed.global_step == tr_full.global_step == 48
    for a, b in zip(train_and_eval_weights(tr_resumed, resumed), train_and_eval_weights(tr_full, full)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    groups, state = optimizer_state(tr_resumed.optimizers[0])
    full_groups, full_state = optimizer_state(tr_full.optimizers[0])
    assert groups == full_groups and groups[0]["step"] == 48 and groups[0]["train_mode"] is False
    assert len(state) == len(full_state) == 8
    for a, b in zip(state, full_state):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------------------------- 4. test/predict
def test_test_predict_and_a_fresh_trainer_from_the_checkpoint_use_eval_weights(tmp_path: Path) -> None:
    model = Probe()
    tr = fit(model, 3, tmp_path, limit_val_batches=8)
    model.seen.clear()
    tr.test(model, datamodule=TinyData())
    tr.predict(model, loader())
    tr.validate(model, datamodule=TinyData())
    tr.test(model, datamodule=TinyData(), ckpt_path=tmp_path / "last.ckpt")
    fresh = Probe(seed=123)
    fresh.expected_eval = model.expected_eval
    fresh_tr = trainer(callbacks=[ScheduleFreeEval()])
    fresh_tr.test(fresh, datamodule=TinyData(), ckpt_path=tmp_path / "last.ckpt")
    fresh_tr.predict(fresh, loader())
    assert [s[0] for s in model.seen] == ["test"] * 8 + ["predict"] * 8 + ["val"] * 8 + ["test"] * 8
    assert [s[0] for s in fresh.seen] == ["test"] * 8 + ["predict"] * 8
    assert max(s[3] for s in model.seen + fresh.seen) < 1e-14
    assert all(s[2] == [False] for s in model.seen if s[0] == "val")


class FailingProbe(Probe):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.trainer.global_step == 12:
            raise RuntimeError("stop here")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("stage", ["test", "predict", "val"])
def test_after_a_failed_fit_test_predict_and_validate_switch_to_eval_weights(stage: str) -> None:
    model = FailingProbe()
    tr = trainer(max_epochs=3, limit_val_batches=8, callbacks=[ScheduleFreeEval()])
    with pytest.raises(RuntimeError, match="stop here"):
        tr.fit(model, datamodule=TinyData())
    assert modes(tr.optimizers[0]) == [True]  # fit never ended: the module still holds y
    model.seen.clear()
    run = {"test": tr.test, "predict": tr.predict, "val": tr.validate}[stage]
    run(model, loader())
    assert [s[0] for s in model.seen] == [stage] * 8
    assert max(s[3] for s in model.seen) < 1e-14
    y, x = train_and_eval_weights(tr, model)
    assert (x - y).abs().max() > 1e-3


def test_a_checkpoint_loaded_between_fits_replaces_the_kept_train_weights(tmp_path: Path) -> None:
    model = Probe()
    tr = fit(model, 2, tmp_path, limit_val_batches=1)
    early = tmp_path / "epoch=0-step=8.ckpt"
    tr.validate(model, datamodule=TinyData(), ckpt_path=early)
    model._after_step = flat(torch.load(early, weights_only=True)["state_dict"].values())
    model.seen.clear()
    tr.fit_loop.max_epochs = 3
    tr.fit(model, datamodule=TinyData())  # a fresh optimizer from the weights the module holds, as without the callback
    assert model.seen[0][0] == "train" and model.seen[0][3] == 0.0


# ---------------------------------------------------------------------------------------------------- 5. errors
def test_without_a_schedule_free_optimizer_it_says_what_to_do() -> None:
    model = TinyRegression(OptimizerConfig("adamw", lr=1e-2))
    with pytest.raises(MisconfigurationException,
                       match=r"switches schedule-free optimizers.*returned Adam\. .*schedulefree_adamw.*remove"):
        trainer(max_epochs=1, callbacks=[ScheduleFreeEval()]).fit(model, loader())


def test_sharded_strategies_and_weights_only_checkpoints_are_flagged(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="FSDPStrategy shards them. Use strategy='ddp'"):
        ScheduleFreeEval().setup(SimpleNamespace(strategy=FSDPStrategy()), TinyRegression(CONFIG), "fit")
    weights_only = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    with pytest.warns(UserWarning, match=r"save_weights_only=True\) writes the training weights"):
        fit(TinyRegression(CONFIG), 1, callbacks=[weights_only], enable_checkpointing=True)


# ---------------------------------------------------------------------------------------------------- 6. after fit
def test_the_module_holds_eval_weights_after_fit_also_when_resuming_had_nothing_to_do(tmp_path: Path) -> None:
    model = Probe()
    tr = fit(model, 3, tmp_path)
    y, x = train_and_eval_weights(tr, model)
    torch.testing.assert_close(x, model.expected_eval, rtol=1e-14, atol=1e-15)
    assert (x - y).abs().max() > 1e-3
    assert modes(tr.optimizers[0]) == [False]
    done = Probe(seed=123)
    tr_done = fit(done, 3, ckpt_path=tmp_path / "last.ckpt")  # already at max_epochs: no training hook runs
    torch.testing.assert_close(flat(done.parameters()), x, rtol=1e-14, atol=1e-15)
    assert modes(tr_done.optimizers[0]) == [False]
    for a, b in zip(train_and_eval_weights(tr_done, done), (y, x)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------------------------------- optimizers
class TwoOptimizers(TinyRegression):
    """Manual optimization with one optimizer per layer; the second is schedule-free or plain Adam."""

    def __init__(self, second: str) -> None:
        super().__init__(CONFIG)
        self.automatic_optimization = False
        self.second = second
        self.gaps: list[tuple[list[bool], float]] = []
        self.expected_eval: torch.Tensor | None = None

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        second = OptimizerConfig(self.second, lr=1e-2, weight_decay=1e-3)
        return [CONFIG.build(self.net[0]), second.build(self.net[2])]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        optimizers = self.optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self(x), y))
        for optimizer in optimizers:
            optimizer.step()
        self.expected_eval = eval_of_copy(self.net, *self.trainer.optimizers)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.gaps.append((modes(*self.trainer.optimizers),
                          (flat(self.parameters()) - self.expected_eval).abs().max().item()))


@pytest.mark.parametrize("second", ["schedulefree_adamw", "adam"])
def test_several_optimizers_switch_together(second: str, tmp_path: Path) -> None:
    model = TwoOptimizers(second)
    tr = fit(model, 2, tmp_path, limit_val_batches=2)
    sf_groups = 2 if second == "schedulefree_adamw" else 1
    assert [m for m, _ in model.gaps] == [[False] * sf_groups] * 4
    assert max(g for _, g in model.gaps) < 1e-14
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    torch.testing.assert_close(flat(ckpt["state_dict"].values()), flat(model.parameters()), rtol=1e-14, atol=1e-15)
    assert len(ckpt["callbacks"]["ScheduleFreeEval"]["train_weights"]) == sf_groups
    assert modes(*tr.optimizers) == [False] * sf_groups


def test_resuming_with_other_optimizers_says_so(tmp_path: Path) -> None:
    fit(TwoOptimizers("adam"), 1, tmp_path)
    with pytest.raises(MisconfigurationException, match=r"weights for 1 optimizer\(s\) with \[2\] parameters, but "
                       r"configure_optimizers now returns 2 schedule-free optimizer\(s\) with \[2, 2\]"):
        fit(TwoOptimizers("schedulefree_adamw"), 2, ckpt_path=tmp_path / "last.ckpt")


# ---------------------------------------------------------------------------------------------------- DDP
class RankWeights(Callback):
    """Each rank writes the weights its validation sees."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        torch.save(flat(pl_module.parameters()), self.folder / f"rank{trainer.global_rank}-{trainer.current_epoch}.pt")


def test_ddp_ranks_hold_the_same_weights_as_one_process(tmp_path: Path) -> None:
    single = TinyRegression(CONFIG)
    fit(single, 2, data=TinyData(batch_size=16))
    ddp = TinyRegression(CONFIG)
    # 2 ranks x 8 = the same 16 samples per optimizer step as the single process
    fit(ddp, 2, tmp_path, data=ShardedData(batch_size=8), devices=2, strategy="ddp_spawn",
        use_distributed_sampler=False, limit_val_batches=1, callbacks=[RankWeights(tmp_path)])
    torch.testing.assert_close(flat(ddp.parameters()), flat(single.parameters()), rtol=1e-9, atol=1e-12)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    torch.testing.assert_close(flat(ckpt["state_dict"].values()), flat(single.parameters()), rtol=1e-9, atol=1e-12)
    last = [torch.load(tmp_path / f"rank{r}-1.pt") for r in (0, 1)]
    assert torch.equal(last[0], last[1])
    torch.testing.assert_close(last[0], flat(single.parameters()), rtol=1e-9, atol=1e-12)


def test_warmup_fraction_equals_the_optimizers_own_warmup_steps() -> None:
    model = TinyRegression(CONFIG)
    tr = trainer(max_epochs=7, callbacks=[ScheduleFreeEval(warmup=0.25)])
    tr.fit(model, datamodule=TinyData())  # 7 epochs x 8 steps: warm-up over 14 steps
    assert [g["warmup_steps"] for g in tr.optimizers[0].param_groups] == [14]
    own = TinyRegression(OptimizerConfig("schedulefree_adamw", lr=1e-2, weight_decay=1e-3,
                                         kwargs={"warmup_steps": 14}))
    trainer(max_epochs=7, callbacks=[ScheduleFreeEval()]).fit(own, datamodule=TinyData())
    torch.testing.assert_close(flat(model.parameters()), flat(own.parameters()), rtol=1e-12, atol=1e-14)
    no_warmup = TinyRegression(CONFIG)
    trainer(max_epochs=7, callbacks=[ScheduleFreeEval()]).fit(no_warmup, datamodule=TinyData())
    assert (flat(model.parameters()) - flat(no_warmup.parameters())).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"fraction of the run's optimizer steps"):
        ScheduleFreeEval(warmup=5)


def test_the_lr_of_each_step_is_logged_warmup_included(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="sf")
    tr = trainer(max_epochs=2, logger=logger, log_every_n_steps=1,
                 callbacks=[ScheduleFreeEval(warmup=0.5)])  # 16 steps: warm-up over 8
    tr.fit(TinyRegression(CONFIG), datamodule=TinyData())
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        lrs = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f) if r.get("lr")}
    # step k (0-based) is the optimizer's (k + 1)-th: lr * min(1, (k + 1) / 8), as pytorch-optimizer computes it
    assert lrs == pytest.approx({k: 1e-2 * min(1.0, (k + 1) / 8) for k in range(16)})


# ---------------------------------------------------------------------------------------------------- BatchNorm
BN_BATCHES = 3


def bn_state(module: nn.Module) -> list[torch.Tensor]:
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms
    return [b.detach().clone() for m in norms for b in (m.running_mean, m.running_var)]


def bn_oracle(net: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Any]) -> list[torch.Tensor]:
    """BatchNorm statistics at x from torch's own update_bn, on deep copies (the originals untouched)."""
    net, optimizer = copy.deepcopy((net, optimizer))
    optimizer.eval()
    torch.optim.swa_utils.update_bn(batches, net)
    return bn_state(net)


class BNProbe(TinyRegression):
    """A BatchNorm network that checks, at validation and at every save, the statistics against the oracle."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(CONFIG, norm=True, seed=seed)
        self.recent: list[Any] = []
        self.gaps: list[tuple[str, float]] = []
        self.train_stats: dict[int, list[torch.Tensor]] = {}

    def expected(self) -> list[torch.Tensor]:
        return bn_oracle(self.net, self.trainer.optimizers[0], self.recent)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.train_stats[self.global_step] = bn_state(self)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.recent = (self.recent + [batch])[-BN_BATCHES:]
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.recent:
            self.gaps.append(("val", max((a - b).abs().max().item() for a, b in zip(bn_state(self), self.expected()))))
        super().validation_step(batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the callbacks' hooks ran first: the state dict holds what the callback wrote; the module still holds y
        saved = [checkpoint["state_dict"][f"net.1.{k}"] for k in ("running_mean", "running_var")]
        self.gaps.append(("save", max((a - b).abs().max().item() for a, b in zip(saved, self.expected()))))


def bn_fit(model: TinyRegression, epochs: int, bn_batches: int = BN_BATCHES, tmp_path: Path | None = None,
           ckpt_path: Path | None = None, callbacks: list[Callback] | None = None, **kwargs: Any) -> Any:
    callbacks = [ScheduleFreeEval(bn_batches=bn_batches), *(callbacks or [])]
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_last=True))
    kwargs.setdefault("limit_val_batches", 2)
    tr = trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=tmp_path is not None, **kwargs)
    tr.fit(model, datamodule=TinyData(), ckpt_path=ckpt_path)
    return tr


def test_bn_statistics_are_reestimated_at_x_for_validation_and_checkpoints(tmp_path: Path) -> None:
    model = BNProbe()
    every = ModelCheckpoint(dirpath=tmp_path / "steps", save_top_k=-1, every_n_train_steps=5)  # mid-epoch, no val
    tr = bn_fit(model, 3, tmp_path=tmp_path, callbacks=[every])
    kinds = [k for k, _ in model.gaps]
    assert kinds.count("val") == 6 and kinds.count("save") >= 6  # 2 batches x 3 epochs; epoch ends and steps 5, 10..
    assert max(g for _, g in model.gaps) < 1e-12
    # the statistics really changed: the training ones (of y) differ from the re-estimated ones (of x)
    expected = model.expected()  # after fit the module holds x: the oracle's eval() on the copy changes nothing
    assert max((a - b).abs().max().item() for a, b in zip(model.train_stats[23], expected)) > 1e-3
    # after fit the module holds x with its statistics (what an export gets)
    assert max((a - b).abs().max().item() for a, b in zip(bn_state(model), expected)) < 1e-12
    assert tr.state.finished


def test_bn_reestimation_leaves_the_training_run_unchanged() -> None:
    with_bn, without = BNProbe(), BNProbe()
    tr_with, tr_without = bn_fit(with_bn, 3), bn_fit(without, 3, bn_batches=0)
    for a, b in zip(train_and_eval_weights(tr_with, with_bn)[0:1], train_and_eval_weights(tr_without, without)[0:1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert with_bn.train_stats.keys() == without.train_stats.keys()
    for step, stats in without.train_stats.items():  # training statistics put back after every validation
        for a, b in zip(with_bn.train_stats[step], stats):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"step {step}")


def test_bn_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    full, first, resumed = BNProbe(), BNProbe(), BNProbe(seed=123)
    bn_fit(full, 6)
    bn_fit(first, 3, tmp_path=tmp_path)
    bn_fit(resumed, 6, ckpt_path=tmp_path / "last.ckpt")
    for (name, a), b in zip(resumed.state_dict().items(), full.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)  # x and its statistics
    for step in range(24, 48):  # the training statistics came back from the checkpoint, not from x's
        for a, b in zip(resumed.train_stats[step], full.train_stats[step]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=f"step {step}")


def test_bn_evaluation_before_any_training_batch_warns(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    # sanity checks (fresh and resumed) have no batches yet and are discarded anyway: quiet
    bn_fit(BNProbe(), 1, tmp_path=tmp_path, num_sanity_val_steps=2)
    bn_fit(BNProbe(), 2, ckpt_path=tmp_path / "last.ckpt", num_sanity_val_steps=2)
    assert not [w for w in recwarn if "before any training batch" in str(w.message)]
    # a resumed fit with nothing left to train ends on x without batches to estimate from: said so
    with pytest.warns(UserWarning, match="before any training batch"):
        bn_fit(BNProbe(), 1, ckpt_path=tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="bn_batches is a number of training batches"):
        ScheduleFreeEval(bn_batches=-1)


class RankStats(Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        torch.save(bn_state(pl_module), self.folder / f"bn{trainer.global_rank}-{trainer.current_epoch}.pt")


def test_bn_statistics_are_pooled_over_ddp_ranks(tmp_path: Path) -> None:
    model = TinyRegression(CONFIG, norm=True)
    tr = trainer(max_epochs=2, devices=2, strategy="ddp_spawn", use_distributed_sampler=False, limit_val_batches=1,
                 enable_checkpointing=True,
                 callbacks=[ScheduleFreeEval(bn_batches=2), RankStats(tmp_path),
                            ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    tr.fit(model, datamodule=ShardedData(batch_size=8))
    ranks = [torch.load(tmp_path / f"bn{r}-1.pt") for r in (0, 1)]
    for a, b in zip(*ranks):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # one set of statistics, pooled
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert saved["net.1.num_batches_tracked"] == 2  # re-estimated from the 2 recent batches at the save too


def test_update_bn_matches_torch_and_leaves_modes_momenta_and_rng_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.BatchNorm1d(6, momentum=0.3), nn.Linear(6, 1)).double()
    batches = [(torch.randn(8, 4, dtype=torch.float64), None) for _ in range(3)]
    oracle = copy.deepcopy(net)
    net.eval()
    net[1].train()  # a mixed state, to be given back as it was
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    update_bn(net, batches)
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew from a forked stream
    assert [m.training for m in net] == [False, True, False, False] and net[2].momentum == 0.3
    torch.manual_seed(1)  # the forked stream started here too: the same dropout masks for torch's update_bn
    torch.optim.swa_utils.update_bn([b[0] for b in batches], oracle)
    for a, b in zip(net[2].buffers(), oracle[2].buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert net[2].num_batches_tracked == 3


def test_weight_swap_puts_x_in_and_y_back_exactly_and_saves_y() -> None:
    """WeightSwap without a trainer: to_eval gives eval()'s x (oracle: a deep copy), to_train the bitwise y, and a
    loaded state_dict's y is what the next to_train puts back."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    optimizer = CONFIG.build(net)
    for _ in range(5):
        optimizer.zero_grad()
        net(torch.randn(8, 3, dtype=torch.float64)).pow(2).mean().backward()
        optimizer.step()
    y, x = flat(net.parameters()).clone(), eval_of_copy(net, optimizer)
    assert not torch.allclose(x, y)
    swap = WeightSwap()
    swap.module, swap.optimizers = net, [optimizer]
    swap.to_eval()
    assert swap.holds_average and modes(optimizer) == [False]
    torch.testing.assert_close(flat(net.parameters()), x, rtol=0, atol=0)
    saved = copy.deepcopy(swap.state_dict())
    swap.to_eval()  # a second switch keeps the first y
    swap.to_train()
    assert not swap.holds_average and modes(optimizer) == [True]
    assert torch.equal(flat(net.parameters()), y)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    swap.load_state_dict(saved)
    swap.to_train()
    assert torch.equal(flat(net.parameters()), y)
