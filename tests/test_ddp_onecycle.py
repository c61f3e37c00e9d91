"""OneCycleWD under DDP (2 CPU processes, gloo): the same global batch gives the same weights as one process."""

from __future__ import annotations

import pytest
import torch
from _tiny import ShardedData, TinyRegression, loader, trainer

from lightning_adamw import OneCycle2018, OneCycleWD, OptimizerConfig

CONFIGS = {"adamw": OptimizerConfig("adamw", lr=5e-3, betas=(0.95, 0.99), weight_decay=0.1),
           # Muon's state (momentum buffers of flattened matrices) beside AdamW's, one optimizer under DDP
           "muon": OptimizerConfig("muon", lr=5e-3, betas=(0.95, 0.99), weight_decay=0.1)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_processes_match_one_with_the_same_global_batch(name: str) -> None:
    config = CONFIGS[name]
    single = TinyRegression(config)
    trainer(max_epochs=3, callbacks=[OneCycleWD(OneCycle2018())]).fit(single, loader(batch_size=16))

    ddp = TinyRegression(config)
    tr = trainer(max_epochs=3, devices=2, strategy="ddp_spawn", use_distributed_sampler=False,
                 callbacks=[OneCycleWD(OneCycle2018())])
    # 2 ranks x 8 = the same 16 samples per optimizer step; each rank counts 12 optimizer steps for the schedule
    tr.fit(ddp, datamodule=ShardedData(batch_size=8))
    for a, b in zip(ddp.parameters(), single.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
