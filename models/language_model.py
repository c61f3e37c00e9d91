"""``LanguageModel``: the LightningModule that trains and evaluates AWD-LSTM and AWD-QRNN on WikiText-2.

* Training (the study's fastai 0.7 loop, ``lm_rnn.py``): the hidden state is carried from one window to the next and
  detached, reset at every epoch start; the loss is the cross-entropy plus activation regularisation (AR,
  ``alpha * mean(h^2)``) and temporal activation regularisation (TAR, ``beta * mean((h_t - h_{t-1})^2)``), both on
  the last layer's output before the output dropout (fastai ``seq2seq_reg``; ``ar_on="dropped"`` takes AR after it,
  as awd-lstm-lm's ``main.py`` does). ``scale_lr_by_seq_len=True`` scales the step's lr by ``seq_len / bptt``
  (awd-lstm-lm; the study's loop does not) through ``lr_scale``, which :class:`lightning_adamw.OneCycleWD` reads.
  Gradient clipping is the Trainer's ``gradient_clip_val``.
* Evaluation: perplexity ``exp(sum NLL / number of tokens)`` over the whole split, from summed states that
  torchmetrics reduces across devices; with ``cache_pointer=True`` also the neural cache pointer's ``*/ppl_cache``.
* Logged: ``train/loss``, ``train/ppl``, ``val/loss``, ``val/ppl``, ``test/loss``, ``test/ppl`` (and ``*/ppl_cache``).

The network is given as a callable that takes the vocabulary size (a ``class_path`` in a config), so the vocabulary
can come from the datamodule: with ``vocab_size=None`` the network is built in ``configure_model`` from
``trainer.datamodule.vocab_size`` and the size is stored in the hyperparameters, so checkpoints reload without the
data.

Example (YAML)::

    model:
      class_path: LanguageModel
      init_args:
        network: {class_path: AWDLSTM, init_args: {emb_size: 400, hidden_size: 1150}}
        optimizer: {name: adam, lr: 5.0e-3, betas: [0.8, 0.99], weight_decay: 1.2e-6, wd_mode: l2}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from datamodules.contract import IGNORE_INDEX, TokenData, require
from lightning_adamw import OptimizerConfig
from models.awd import AWDNetwork
from models.cache_pointer import NeuralCache


class LanguageModel(LightningModule):
    """A word-level recurrent language model (AWD-LSTM or AWD-QRNN) with AWD training and cache evaluation.

    Args:
        network: builds the network from the vocabulary size, e.g. ``functools.partial(AWDLSTM, emb_size=400)``
            or, in a config, ``{class_path: AWDQRNN, init_args: {...}}``.
        vocab_size: the vocabulary size; ``None`` takes ``trainer.datamodule.vocab_size`` when training starts.
        optimizer: the optimizer (``lightning_adamw.OptimizerConfig``); the schedule comes from ``OneCycleWD``.
        ar_alpha: activation regularisation weight (AWD-LSTM 2; the 2018 AWD-LSTM recipe 3).
        tar_beta: temporal activation regularisation weight (AWD-LSTM 1; the 2018 AWD-LSTM recipe 1.5).
        ar_on: the last layer's output AR is computed on: ``"undropped"``, before the output dropout (the study's
            fastai 0.7 ``seq2seq_reg``), or ``"dropped"``, after it (awd-lstm-lm; with output dropout ``p`` that AR is
            about ``1 / (1 - p)`` times stronger for the same ``ar_alpha``). TAR is always on the undropped output.
        scale_lr_by_seq_len: multiply each step's lr by ``seq_len / bptt`` (awd-lstm-lm ``main.py``; the study's
            fastai 0.7 loop does not).
        cache_pointer: also evaluate with the neural cache pointer (validate and test), logging ``*/ppl_cache``; the
            four cache settings are not saved in checkpoints, so they can be switched on when testing one.
        cache_theta: the cache's ``theta`` (WikiText-2: 0.662).
        cache_lambda: the cache's mixture weight ``lambda`` (WikiText-2: 0.1279).
        cache_window: positions kept in the cache (WikiText-2: 3785).
    """

    def __init__(
        self,
        network: Callable[[int], AWDNetwork],
        vocab_size: int | None = None,
        optimizer: OptimizerConfig | None = None,
        ar_alpha: float = 2.0,
        tar_beta: float = 1.0,
        ar_on: Literal["undropped", "dropped"] = "undropped",
        scale_lr_by_seq_len: bool = False,
        cache_pointer: bool = False,
        cache_theta: float = 0.662,
        cache_lambda: float = 0.1279,
        cache_window: int = 3785,
    ) -> None:
        super().__init__()
        if ar_alpha < 0 or tar_beta < 0:
            raise ValueError(f"ar_alpha and tar_beta must be >= 0, got {ar_alpha} and {tar_beta}.")
        if ar_on not in ("undropped", "dropped"):
            raise ValueError(f"ar_on must be 'undropped' (the study's) or 'dropped' (awd-lstm-lm), got {ar_on!r}.")
        if vocab_size is not None and vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2 (or None to take the datamodule's), got {vocab_size}.")
        # the cache settings are evaluation switches, not part of the trained model: kept out of the checkpoint, because
        # LightningCLI lets a checkpoint's hyperparameters override the command line (`test --ckpt_path ...
        # --model.init_args.cache_pointer true` would otherwise be ignored)
        self.save_hyperparameters(ignore=["cache_pointer", "cache_theta", "cache_lambda", "cache_window"])
        self.network_factory = network
        self.optimizer_config = optimizer or OptimizerConfig()
        self.ar_alpha, self.tar_beta = ar_alpha, tar_beta
        self.ar_on = ar_on
        self.scale_lr_by_seq_len = scale_lr_by_seq_len
        self.cache = NeuralCache(cache_theta, cache_lambda, cache_window) if cache_pointer else None
        #: read by OneCycleWD at every optimizer step (AWD-LSTM's seq_len / bptt lr scaling)
        self.lr_scale = 1.0
        self.net: AWDNetwork | None = None
        if vocab_size is not None:
            self.net = network(vocab_size)
        self.nll = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self.nll_cache = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self._hidden: dict[str, Any] = {"train": None, "val": None, "test": None}

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        # The network is built here from the vocabulary the datamodule built in setup (which runs first). A
        # checkpoint restored afterwards brings its own vocabulary and size (on_load_checkpoint), so whether the
        # sizes agree can only be checked once a stage starts (_check_vocab_size).
        if self.net is not None:
            return
        data = require(getattr(self._trainer, "datamodule", None), TokenData, "LanguageModel(vocab_size=None)",
                       "or pass model.init_args.vocab_size")
        self.net = self.network_factory(data.vocab_size)
        self.hparams["vocab_size"] = data.vocab_size  # so the checkpoint rebuilds the same network

    def _check_vocab_size(self) -> None:
        # Lightning has no single hook after a checkpoint is restored: this runs at the start of each stage
        size = getattr(self.trainer.datamodule, "vocab_size", None)
        if size is not None and size != self.network.vocab_size:
            raise ValueError(
                f"LanguageModel(vocab_size={self.network.vocab_size:,}) but the datamodule's vocabulary has "
                f"{size:,} words: drop the model's vocab_size (it is then taken from the datamodule) or fix it."
            )

    def on_fit_start(self) -> None:
        self._check_vocab_size()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Evaluating a checkpoint with a datamodule whose train file differs: configure_model sized the network from
        # that file's vocabulary, the checkpoint's vocabulary replaces it (WikiText2.load_state_dict); so does the size.
        size = checkpoint.get("hyper_parameters", {}).get("vocab_size")
        if size is None or self.net is None or size == self.net.vocab_size:
            return
        if self._trainer is not None and self._trainer.state.fn == "fit":
            raise ValueError(
                f"The checkpoint's vocabulary has {size:,} words but this run's has {self.net.vocab_size:,}: resume "
                "training with the train file the checkpoint was trained on."
            )
        reference = next(self.net.parameters())
        self.net = self.network_factory(size).to(device=reference.device, dtype=reference.dtype)
        self.hparams["vocab_size"] = size

    @property
    def network(self) -> AWDNetwork:
        """The built network."""
        if self.net is None:
            raise RuntimeError(
                "LanguageModel's network is not built yet: pass vocab_size, or let the Trainer call configure_model."
            )
        return self.net

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_config.build(self)

    # ------------------------------------------------------------------ steps
    def forward(self, tokens: Tensor, hidden: list[Any] | None = None) -> tuple[Tensor, list[Any]]:
        """Logits ``(time, batch, vocab)`` for ``(time, batch)`` token ids, and the new hidden state."""
        out = self.network(tokens, hidden)
        return self.network.decode(out.output), out.hidden

    def on_train_epoch_start(self) -> None:
        self._hidden["train"] = None

    def training_step(self, batch: tuple[Tensor, Tensor, int], batch_idx: int) -> Tensor:
        inputs, targets, bptt = batch
        if self.scale_lr_by_seq_len:
            self.lr_scale = inputs.size(0) / bptt
        out = self.network(inputs, self._hidden["train"])
        self._hidden["train"] = apply_to_collection(out.hidden, Tensor, Tensor.detach)
        logits = self.network.decode(out.output)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        reg = self.ar_alpha * (out.raw_output if self.ar_on == "undropped" else out.output).pow(2).mean()
        if out.raw_output.size(0) > 1:
            reg = reg + self.tar_beta * (out.raw_output[1:] - out.raw_output[:-1]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", loss.exp())
        return loss + reg

    def _eval_start(self, stage: str) -> None:
        self._hidden[stage] = None
        if self.cache is not None:
            self.cache.reset()

    def _eval_step(self, batch: tuple[Tensor, Tensor, int], stage: str) -> None:
        inputs, targets, _ = batch
        out = self.network(inputs, self._hidden[stage])
        self._hidden[stage] = out.hidden
        log_probs = torch.log_softmax(self.network.decode(out.output).float(), dim=-1)
        counted = targets != IGNORE_INDEX
        log_p = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        self.nll[stage].update(-log_p[counted])
        if self.cache is not None:
            p = self.cache(out.raw_output.float(), log_p.exp(), targets)
            self.nll_cache[stage].update(-torch.log(p[counted]))

    def _eval_end(self, stage: str) -> None:
        nll = self.nll[stage].compute()
        self.log(f"{stage}/loss", nll)
        self.log(f"{stage}/ppl", nll.exp(), prog_bar=True)
        self.nll[stage].reset()
        if self.cache is not None:
            self.log(f"{stage}/ppl_cache", self.nll_cache[stage].compute().exp(), prog_bar=True)
            self.nll_cache[stage].reset()

    def on_validation_start(self) -> None:
        self._check_vocab_size()

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val")

    def validation_step(self, batch: tuple[Tensor, Tensor, int], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_start(self) -> None:
        self._check_vocab_size()

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def test_step(self, batch: tuple[Tensor, Tensor, int], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")
