"""The plugin's GPU checks, for a machine with CUDA: AdamW and Muon parity on the device, bf16 and fp16 mixed precision.

    python bench/gpu_checks.py

Prints one markdown row per check. The CPU test suite covers the same logic; this confirms it on real CUDA kernels
(foreach ops on device tensors, CUDA GradScaler skipping a step, bf16 autocast).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_adamw import MuonAdamW, OneCycle, OneCycleWD, OptimizerConfig  # noqa: E402

STEPS, LR, WD = 60, 3e-3, 0.1


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


def data() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 32, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (STEPS * 32,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=32)


class Classifier(pl.LightningModule):
    def __init__(self, inf_at: int | None = None) -> None:
        super().__init__()
        self.net, self.inf_at, self.losses = net(), inf_at, []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss))
        return loss * float("inf") if self.global_step == self.inf_at else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OptimizerConfig("adamw", lr=LR, betas=(0.9, 0.99), weight_decay=WD).build(self.net)


class Snapshots(Callback):
    def __init__(self) -> None:
        self.weights: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.weights[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]


def fit(model: Classifier, precision: str, *callbacks: Callback) -> pl.Trainer:
    # fp16 with init_scale 1 so that only the injected inf makes the GradScaler skip a step
    precision_args: dict[str, Any] = (
        {"plugins": [MixedPrecision("16-mixed", "cuda", torch.amp.GradScaler("cuda", init_scale=1.0))]}
        if precision == "16-mixed" else {"precision": precision}
    )
    trainer = pl.Trainer(accelerator="cuda", devices=1, max_epochs=1, logger=False, **precision_args,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[OneCycleWD(OneCycle()), *callbacks])
    trainer.fit(model, data())
    return trainer


def adamw_parity() -> str:
    model = Classifier()
    fit(model, "32-true")
    reference = net().cuda()
    opt = torch.optim.AdamW(reference.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=WD, foreach=True)
    sched = OneCycleLR(opt, max_lr=LR, total_steps=STEPS)
    for x, y in data():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(reference(x.cuda()), y.cuda()).backward()
        opt.step()
        sched.step()
    diff = max((a.cpu() - b.detach().cpu()).abs().max().item() for a, b in zip(model.net.parameters(),
                                                                               reference.parameters()))
    return (f"| fp32 CUDA: registry adamw + OneCycleWD vs torch AdamW + OneCycleLR, {STEPS} steps "
            f"| max abs diff {diff:.2e} |")


def bf16_run() -> str:
    model = Classifier()
    fit(model, "bf16-mixed")
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    first, last = sum(model.losses[:10]) / 10, sum(model.losses[-10:]) / 10
    return f"| bf16-mixed CUDA: loss first 10 steps {first:.3f} -> last 10 {last:.3f}, weights finite: {finite} | ok |"


def fp16_skip() -> str:
    snapshots = Snapshots()
    model = Classifier(inf_at=5)
    fit(model, "16-mixed", snapshots)
    moved = [any(not torch.equal(a, b) for a, b in zip(snapshots.weights[s], snapshots.weights[s + 1]))
             for s in range(3, 8)]
    verdict = "ok" if moved == [True, True, False, True, True] else "FAILED"
    return (f"| fp16-mixed CUDA: inf loss at step 5, weights moved at steps 3..7: {moved} (no decay on the skip) "
            f"| {verdict} |")


def muon_conv_parity(device: str = "cuda") -> str:
    """MuonAdamW on a conv kernel (4-d) == torch.optim.Muon on the same kernel flattened to (out, in*kh*kw)."""
    gen = torch.Generator().manual_seed(0)
    kernel = nn.Parameter(torch.randn(64, 32, 3, 3, generator=gen).to(device))
    matrix = nn.Parameter(kernel.detach().reshape(64, -1).clone())
    ours = MuonAdamW([kernel], lr=0.02, weight_decay=0.1)
    torch_muon = torch.optim.Muon([matrix], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(10):
        grad = torch.randn(64, 32, 3, 3, generator=gen).to(device)
        kernel.grad, matrix.grad = grad.clone(), grad.reshape(64, -1).clone()
        ours.step()
        torch_muon.step()
    diff = (kernel.detach().reshape(64, -1) - matrix.detach()).abs().max().item()
    return (f"| {device}: MuonAdamW conv kernel vs torch Muon on the flattened kernel, 10 steps "
            f"| max abs diff {diff:.2e} |")


class MuonClassifier(Classifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OptimizerConfig("muon", lr=LR, betas=(0.9, 0.99), weight_decay=WD).build(self.net)


def muon_bf16_run() -> str:
    model = MuonClassifier()
    fit(model, "bf16-mixed")
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    first, last = sum(model.losses[:10]) / 10, sum(model.losses[-10:]) / 10
    return (f"| bf16-mixed CUDA, muon + OneCycleWD: loss first 10 steps {first:.3f} -> last 10 {last:.3f}, "
            f"weights finite: {finite} | {'ok' if finite else 'FAILED'} |")


if __name__ == "__main__":
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} lightning {pl.__version__}")
    print("| check | result |\n|---|---|")
    for check in (adamw_parity, bf16_run, fp16_skip, muon_conv_parity, muon_bf16_run):
        print(check(), flush=True)
