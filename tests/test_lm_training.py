"""The language-model LightningModule: the AWD training step, exact perplexity (one device and DDP), and end-to-end
training of a small AWD-LSTM and a small AWD-QRNN on the real WikiText-2 files (valid standing in for train)."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules.wikitext2 import WikiText2, eval_streams
from lightning_adamw import Constant, OneCycleLM, OneCycleWD, OptimizerConfig
from models.awd_lstm import AWDLSTM
from models.language_model import LanguageModel
from models.qrnn import AWDQRNN

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def tiny_network(arch: str = "lstm", dropout: float = 0.0) -> functools.partial:
    drops = {f"dropout_{k}": dropout for k in ("input", "hidden", "output", "embedding", "weight")}
    if arch == "qrnn":
        return functools.partial(AWDQRNN, emb_size=8, hidden_size=12, num_layers=2, **drops)
    return functools.partial(AWDLSTM, emb_size=8, hidden_size=12, num_layers=2, **drops)


@pytest.fixture(scope="module")
def small_wt2(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 120 lines of the real validation file as all three splits (~6,000 tokens)."""
    lines = (shared_data / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines(keepends=True)
    folder = tmp_path_factory.mktemp("small_wt2")
    for split in ("train", "valid", "test"):
        (folder / f"wiki.{split}.tokens").write_text("".join(lines[:120]), encoding="utf-8")
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """On CPU cores shared with other jobs, two OpenMP threads stall each other (a validation pass measured 16x
    slower than with one thread); these tiny models gain nothing from a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def call_quietly(fn: Any, *args: Any) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached in these unit tests
        return fn(*args)


def test_training_loss_is_cross_entropy_plus_ar_and_tar() -> None:
    torch.manual_seed(0)
    model = LanguageModel(tiny_network(), vocab_size=30, ar_alpha=2.0, tar_beta=1.0).train()
    inputs, targets = torch.randint(0, 30, (9, 4)), torch.randint(0, 30, (9, 4))
    loss = call_quietly(model.training_step, (inputs, targets, 9), 0)
    out = model.network(inputs)  # no dropout: deterministic
    ce = F.cross_entropy(model.network.decode(out.output).reshape(-1, 30), targets.reshape(-1))
    ar = out.output.pow(2).mean()
    tar = (out.raw_output[1:] - out.raw_output[:-1]).pow(2).mean()
    torch.testing.assert_close(loss, ce + 2.0 * ar + 1.0 * tar)


@pytest.mark.parametrize("ar_on", ["undropped", "dropped"])
def test_ar_is_taken_before_the_output_dropout_by_default(ar_on: str) -> None:
    # the study's fastai 0.7 seq2seq_reg: AR on the last layer's output before the decoder's dropout
    net = functools.partial(AWDLSTM, emb_size=8, hidden_size=12, num_layers=2, dropout_input=0.0,
                            dropout_hidden=0.0, dropout_output=0.4, dropout_embedding=0.0, dropout_weight=0.0)
    kwargs = {} if ar_on == "undropped" else {"ar_on": ar_on}
    model = LanguageModel(net, vocab_size=30, ar_alpha=3.0, tar_beta=0.0, **kwargs).train()
    inputs, targets = torch.randint(0, 30, (9, 4)), torch.randint(0, 30, (9, 4))
    torch.manual_seed(5)
    loss = call_quietly(model.training_step, (inputs, targets, 9), 0)
    torch.manual_seed(5)  # the same dropout mask
    out = model.network(inputs)
    assert not torch.equal(out.output, out.raw_output)  # the dropout is active
    ce = F.cross_entropy(model.network.decode(out.output).reshape(-1, 30), targets.reshape(-1))
    hidden = out.raw_output if ar_on == "undropped" else out.output
    torch.testing.assert_close(loss, ce + 3.0 * hidden.pow(2).mean())


def test_hidden_state_is_carried_detached_and_reset_each_epoch() -> None:
    torch.manual_seed(1)
    model = LanguageModel(tiny_network(), vocab_size=30, ar_alpha=0.0, tar_beta=0.0).train()
    a, b = torch.randint(0, 30, (2, 6, 3))
    targets = torch.randint(0, 30, (6, 3))
    model.on_train_epoch_start()
    call_quietly(model.training_step, (a, targets, 6), 0)
    carried = model._hidden["train"]
    assert all(not t.requires_grad for state in carried for t in state)
    second = call_quietly(model.training_step, (b, targets, 6), 1)
    logits, _ = model(b, carried)
    torch.testing.assert_close(second, F.cross_entropy(logits.reshape(-1, 30), targets.reshape(-1)))
    second.backward()  # only through this window: the carried state is detached
    model.on_train_epoch_start()
    assert model._hidden["train"] is None


class RecordLr(L.Callback):
    """Runs after OneCycleWD in the callback list: records the lr each optimizer step uses."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.seq_lens: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.seq_lens.append(batch[0].size(0))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("scale", [False, True])
def test_lr_is_scaled_by_seq_len_over_bptt_only_when_asked(small_wt2: Path, scale: bool) -> None:
    # awd-lstm-lm scales the lr by seq_len / bptt; the study's fastai 0.7 loop (the default) does not
    torch.manual_seed(2)
    dm = WikiText2(str(small_wt2), download=False, batch_size=4, bptt=20)
    kwargs = {"scale_lr_by_seq_len": True} if scale else {}
    model = LanguageModel(tiny_network(), optimizer=OptimizerConfig("adam", lr=0.01), **kwargs)
    record = RecordLr()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=6, limit_val_batches=0,
                        callbacks=[OneCycleWD(Constant()), record], **QUIET)
    trainer.fit(model, dm)
    assert len(set(record.seq_lens)) > 1
    assert record.lrs == pytest.approx([0.01 * (n / 20 if scale else 1.0) for n in record.seq_lens])
    windows = dm._train_windows
    assert record.seq_lens == [n for _, n in windows.windows(0)[:6] + windows.windows(1)[:6]]
    assert dm.state_dict()["train_epoch"] == 2 and record.seq_lens[:6] != record.seq_lens[6:]
    assert model.hparams.vocab_size == dm.vocab_size == model.network.vocab_size  # sized from the datamodule


def direct_perplexity(model: LanguageModel, ids: torch.Tensor, streams: int) -> float:
    """exp(mean NLL) with each stream read in one forward from a zero state."""
    inputs, targets = eval_streams(ids, streams, 0, 1)
    with torch.no_grad():
        logits, _ = model.eval()(inputs)
    return math.exp(F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)).item())


@pytest.mark.parametrize("eval_batch_size", [1, 3])
def test_validation_perplexity_is_exact(small_wt2: Path, eval_batch_size: int) -> None:
    torch.manual_seed(3)
    dm = WikiText2(str(small_wt2), download=False, eval_batch_size=eval_batch_size, eval_bptt=13)
    dm.setup("validate")  # settles the vocabulary, as the Trainer does before building the model
    model = LanguageModel(tiny_network("qrnn"), vocab_size=dm.vocab_size)
    result = L.Trainer(**QUIET).validate(model, dm, verbose=False)[0]
    dm.setup("validate")
    expected = direct_perplexity(model, dm._encode("valid"), eval_batch_size)
    assert result["val/ppl"] == pytest.approx(expected, rel=1e-5)
    assert result["val/loss"] == pytest.approx(math.log(expected), rel=1e-5)


def test_perplexity_under_ddp_counts_every_token_once(small_wt2: Path) -> None:
    """Two CPU processes with one stream each read exactly the two streams of one process with eval_batch_size=2."""
    torch.manual_seed(4)
    dm = WikiText2(str(small_wt2), download=False, eval_batch_size=1, eval_bptt=50)
    dm.setup("validate")  # settles the vocabulary, as the Trainer does before building the model
    model = LanguageModel(tiny_network("qrnn"), vocab_size=dm.vocab_size)
    expected = direct_perplexity(model, dm._encode("valid"), streams=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", **QUIET)
    result = trainer.validate(model, dm, verbose=False)[0]
    assert result["val/ppl"] == pytest.approx(expected, rel=1e-5)


def test_checkpoint_reloads_without_the_data(small_wt2: Path, tmp_path: Path) -> None:
    torch.manual_seed(5)
    dm = WikiText2(str(small_wt2), download=False, batch_size=4, bptt=20)
    model = LanguageModel(tiny_network("qrnn"))  # vocab_size from the datamodule
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, default_root_dir=tmp_path, **QUIET)
    trainer.fit(model, dm)
    path = tmp_path / "lm.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["WikiText2"]["vocab"] == dm.vocab.itos  # the vocabulary travels with the weights
    assert checkpoint["hyper_parameters"]["vocab_size"] == dm.vocab_size
    # outside LightningCLI the hyperparameters hold the network's functools.partial: not a weights-only load
    restored = LanguageModel.load_from_checkpoint(path, weights_only=False).eval()
    tokens = dm._encode("test")[:200].unsqueeze(1)
    torch.testing.assert_close(restored(tokens)[0], model.eval()(tokens)[0])
    expected = L.Trainer(**QUIET).test(model, dm, verbose=False)[0]["test/ppl"]
    # testing with a datamodule built on another train file: the checkpoint's vocabulary and network size win
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "valid", "test"):
        lines = (small_wt2 / f"wiki.{split}.tokens").read_text(encoding="utf-8").splitlines(keepends=True)
        (other / f"wiki.{split}.tokens").write_text("".join(lines[:40] if split == "train" else lines))
    other_dm = WikiText2(str(other), download=False)
    other_dm.setup("test")
    assert other_dm.vocab_size < dm.vocab_size
    fresh = LanguageModel(tiny_network("qrnn"))  # sized from other_dm by configure_model, resized by the checkpoint
    with pytest.warns(UserWarning, match="checkpoint's vocabulary"):
        result = L.Trainer(**QUIET).test(fresh, other_dm, ckpt_path=path, weights_only=False, verbose=False)[0]
    assert fresh.network.vocab_size == other_dm.vocab_size == dm.vocab_size
    assert result["test/ppl"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------- end to end, real data
STEPS = 300
EVAL_TOKENS = 50_000  # the first 50,000 predictions of wiki.test.tokens (500 windows of 100)


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``eval_ids[1:]`` of the unigram distribution counted on the training tokens."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double()
    return math.exp(-(counts / counts.sum())[eval_ids[1:]].log().mean().item())


def train_and_evaluate(shared_data: Path, network: functools.partial, lr: float) -> dict[str, float]:
    """A few hundred steps of the real pipeline (variable BPTT, carried hidden state, OneCycleLM, clipping) on
    wiki.valid.tokens, then perplexity with and without the cache pointer (recipe theta, lambda, window) on the
    first EVAL_TOKENS of wiki.test.tokens, and the unigram baseline on the same tokens."""
    torch.manual_seed(0)
    dm = WikiText2(str(shared_data / "wikitext-2"), download=False, train_split="valid", val_split="test",
                   batch_size=32, bptt=20, eval_batch_size=1, eval_bptt=100)
    model = LanguageModel(network, optimizer=OptimizerConfig("adam", lr=lr, betas=(0.8, 0.99)),
                          ar_alpha=0.0, tar_beta=0.0, cache_pointer=True)
    trainer = L.Trainer(max_steps=STEPS, callbacks=[OneCycleWD(OneCycleLM())], gradient_clip_val=0.5,
                        limit_val_batches=EVAL_TOKENS // dm.eval_bptt, num_sanity_val_steps=0,
                        check_val_every_n_epoch=10, **QUIET)
    trainer.fit(model, dm)
    result = {k: float(v) for k, v in trainer.validate(model, dm, verbose=False)[0].items()}
    result["unigram"] = unigram_perplexity(dm._encode("valid"), dm._encode("test")[:EVAL_TOKENS + 1], dm.vocab_size)
    return result


# small networks whose few hundred steps fit the test budget; no dropout: a fraction of one epoch cannot overfit
@pytest.fixture(scope="module")
def awd_lstm_result(shared_data: Path) -> dict[str, float]:
    network = functools.partial(AWDLSTM, emb_size=32, hidden_size=128, num_layers=1, dropout_input=0.0,
                                dropout_hidden=0.0, dropout_output=0.0, dropout_embedding=0.0, dropout_weight=0.05)
    return train_and_evaluate(shared_data, network, lr=2e-2)


@pytest.fixture(scope="module")
def awd_qrnn_result(shared_data: Path) -> dict[str, float]:
    network = functools.partial(AWDQRNN, emb_size=32, hidden_size=64, num_layers=2, dropout_input=0.0,
                                dropout_hidden=0.0, dropout_output=0.0, dropout_embedding=0.0, dropout_weight=0.05)
    return train_and_evaluate(shared_data, network, lr=3e-2)


@pytest.mark.slow
@pytest.mark.parametrize("result", ["awd_lstm_result", "awd_qrnn_result"])
def test_small_model_beats_the_unigram_baseline(result: str, request: pytest.FixtureRequest) -> None:
    values = request.getfixturevalue(result)
    assert values["val/ppl"] < 0.7 * values["unigram"], values


@pytest.mark.slow
@pytest.mark.parametrize("result", ["awd_lstm_result", "awd_qrnn_result"])
def test_cache_pointer_lowers_perplexity_on_the_test_file(result: str, request: pytest.FixtureRequest) -> None:
    values = request.getfixturevalue(result)
    assert values["val/ppl_cache"] < 0.85 * values["val/ppl"], values
