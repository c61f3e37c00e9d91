"""One training epoch of AWD-LSTM and of AWD-QRNN at the recipe's sizes on whatever device is available, on tokens
of WikiText-2's size: the real train split when ``--data_dir`` holds it, else random ids (2,088,628 tokens, 33,278
words; timing does not depend on which words). Prints one markdown row per model, and any warning raised while
training (a cuDNN "weights are not part of single contiguous chunk of memory" warning would show here).

    python bench/bench_lm_epoch.py                                  # both models, full epoch, auto device
    python bench/bench_lm_epoch.py --models qrnn --max_steps 50     # a quick look: per-step time, projected epoch
    python bench/bench_lm_epoch.py --data_dir data/wikitext-2 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.wikitext2 import TrainWindows, WikiText2, file_name, train_streams  # noqa: E402
from lightning_adamw import OneCycleLM, OneCycleWD, OptimizerConfig  # noqa: E402
from models.awd_lstm import AWDLSTM  # noqa: E402
from models.language_model import LanguageModel  # noqa: E402
from models.qrnn import AWDQRNN  # noqa: E402

TRAIN_TOKENS, VOCAB = 2_088_628, 33_278  # WikiText-2 train split (Merity et al. 2016)
NETWORKS = {
    # configs/wikitext2_awd_lstm.yaml and configs/wikitext2_qrnn.yaml
    "awd_lstm": functools.partial(AWDLSTM, emb_size=400, hidden_size=1150, num_layers=3),
    "qrnn": functools.partial(AWDQRNN, emb_size=400, hidden_size=1550, num_layers=4, first_window=2),
}
AR_TAR = {"awd_lstm": (3.0, 1.5), "qrnn": (2.0, 1.0)}


class EpochTimer(L.Callback):
    """Wall time of the training batches (device synchronised), without the first ``skip`` steps (warm-up)."""

    def __init__(self, skip: int) -> None:
        self.skip, self.steps, self.start, self.seconds = skip, 0, 0.0, 0.0

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.skip:
            self._sync(trainer)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.steps += 1
        self._sync(trainer)
        self.seconds = time.perf_counter() - self.start


def windows(args: argparse.Namespace) -> tuple[TrainWindows, int, str]:
    if args.data_dir and (Path(args.data_dir) / file_name("train")).is_file():
        dm = WikiText2(args.data_dir, download=False, batch_size=args.batch_size, bptt=args.bptt)
        dm.setup("fit")
        ids = dm._encode("train")
        return TrainWindows(train_streams(ids, args.batch_size, 0, 1), args.bptt, True, 0), dm.vocab_size, "real"
    ids = torch.randint(VOCAB, (TRAIN_TOKENS,), generator=torch.Generator().manual_seed(0))
    return TrainWindows(train_streams(ids, args.batch_size, 0, 1), args.bptt, True, 0), VOCAB, "random"


def run(name: str, args: argparse.Namespace) -> None:
    data, vocab, source = windows(args)
    torch.manual_seed(0)
    alpha, beta = AR_TAR[name]
    model = LanguageModel(NETWORKS[name], vocab_size=vocab, ar_alpha=alpha, tar_beta=beta,
                          optimizer=OptimizerConfig("adam", lr=5e-3, betas=(0.8, 0.99), weight_decay=1.2e-6))
    timer = EpochTimer(skip=args.warmup)
    steps = len(data) if args.max_steps is None else min(args.max_steps, len(data))
    trainer = L.Trainer(
        max_epochs=1, max_steps=steps, precision=args.precision, gradient_clip_val=0.12,
        callbacks=[OneCycleWD(OneCycleLM(), total_steps=len(data)), timer], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=data)
    timed_steps = timer.steps - args.warmup
    per_step = timer.seconds / timed_steps
    device = trainer.strategy.root_device
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)"
    peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "-"
    measured = "full epoch" if steps == len(data) else f"{timed_steps} steps, projected"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"| {name} | {device_name} | {args.precision} | {params:.1f} M | {source} tokens, batch {args.batch_size}, "
          f"bptt {args.bptt} | {len(data)} | {1e3 * per_step:.1f} ms | {per_step * len(data):.0f} s ({measured}) "
          f"| {peak} |")
    own = [w for w in caught if "contiguous" in str(w.message) or "cudnn" in str(w.message).lower()]
    for w in own:
        print(f"  warning: {w.category.__name__}: {w.message}")
    print(f"  ({len(caught)} warnings while training, {len(own)} about cuDNN / contiguous weights)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(NETWORKS), default=["awd_lstm", "qrnn"])
    parser.add_argument("--data_dir", default=None, help="folder with wiki.train.tokens (default: random tokens)")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--bptt", type=int, default=70)
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 32-true, bf16-mixed")
    parser.add_argument("--max_steps", type=int, default=None, help="time only this many steps and project")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    args = parser.parse_args()
    print("| model | device | precision | params | data | steps/epoch | time/step | epoch | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        run(name, args)


if __name__ == "__main__":
    main()
