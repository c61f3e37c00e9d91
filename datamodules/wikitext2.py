"""WikiText-2 (v1, word level) for language modelling, batched the AWD-LSTM way.

Tokens are each line split on whitespace plus ``<eos>`` (Merity et al.'s ``data.py``), the vocabulary is built on the
training split in order of first occurrence and kept in the datamodule's ``state_dict`` (saved in checkpoints and
reused at test time); words the vocabulary lacks become ``<unk>``, and the rate is reported per split.

Lightning's hooks divide the work: ``prepare_data`` downloads missing files (once per node), ``setup`` builds the
vocabulary on the training split, the model sizes its network from ``vocab_size`` in ``configure_model``; when the
Trainer then restores a checkpoint, its vocabulary replaces this one (``load_state_dict``) and its network size the
model's (``LanguageModel.on_load_checkpoint``), so a checkpoint is always evaluated with the words it was trained on.

* Training: the corpus cut into ``batch_size`` parallel streams per device (each device its own streams), windows of
  variable length as in AWD-LSTM (``N(bptt, 5)`` with probability 0.95, else ``N(bptt / 2, 5)``, at least 5), the
  same number of windows every epoch so the 1cycle schedule knows the run length. The model carries its hidden state
  from one window to the next.
* Evaluation: the whole split as ``eval_batch_size`` streams per device (1 by default, the published protocol) in
  windows of ``eval_bptt``; every prediction is counted exactly once (the last stream is padded with ignored targets).

Example::

    dm = WikiText2("data/wikitext-2", batch_size=100, bptt=70)
    dm.prepare_data()    # what the Trainer calls first: downloads missing files
    dm.setup("fit")
    dm.vocab_size        # 33278
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from datamodules.contract import IGNORE_INDEX, rank_world

Split = Literal["train", "valid", "test"]

EOS = "<eos>"
UNK = "<unk>"

#: The maintained mirror: the PyTorch examples repository keeps the three WikiText-2 v1 token files as plain text
#: (the Salesforce S3 archive the dataset was published in is no longer reliably served).
MIRROR = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2"
OFFICIAL_ARCHIVE = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"


@dataclass(frozen=True)
class TokenFile:
    """What a downloaded split must contain.

    ``token_sha256`` digests the token stream (tokens joined by one space, ``<eos>`` per line), so a mirror that
    normalises whitespace still verifies; computed from the official ``wiki.valid.tokens`` and ``wiki.test.tokens``
    (the copies in the project's shared test data). No official train file was at hand to digest: its counts are
    pinned instead (Merity et al. 2016, Table 1: 2,088,628 tokens, vocabulary 33,278 with ``<eos>``; 36,718 lines, the
    count torchtext's WikiText2 checks).
    """

    mirror_name: str
    lines: int
    tokens: int
    types: int | None = None
    token_sha256: str | None = None


FILES: dict[Split, TokenFile] = {
    "train": TokenFile("train.txt", lines=36_718, tokens=2_088_628, types=33_278),
    "valid": TokenFile(
        "valid.txt", lines=3_760, tokens=217_646, types=13_777,
        token_sha256="f23171c70990a08e46712bc7010204d25504a5e829dd64da77c492e9662d6c4a",
    ),
    "test": TokenFile(
        "test.txt", lines=4_358, tokens=245_569, types=14_143,
        token_sha256="0be791a42497fdb14b9b366a71eb2e87839b639c9c359b3a901d2415e6128e86",
    ),
}


def file_name(split: Split) -> str:
    """The official file name of ``split`` (``wiki.valid.tokens``)."""
    return f"wiki.{split}.tokens"


def read_tokens(path: Path) -> tuple[list[str], int]:
    """``(tokens, lines)`` of a WikiText token file: each line split on whitespace, then ``<eos>``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not UTF-8 text, or holds no word (empty or whitespace only).
    """
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 file {path} does not exist.")
    tokens: list[str] = []
    lines = 0
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"WikiText-2 file {path} is not UTF-8 text ({err.reason} at byte {err.start}, line {line}): replace it "
            f"with the official file (from {OFFICIAL_ARCHIVE}) or delete it so it is downloaded again."
        ) from err
    for line_text in io.StringIO(text, newline=None):  # the line endings open() accepts
        tokens.extend(line_text.split())
        tokens.append(EOS)
        lines += 1
    if lines == len(tokens):
        raise ValueError(
            f"WikiText-2 file {path} is empty or holds only whitespace ({lines} lines, no words): replace it with the "
            f"official file (from {OFFICIAL_ARCHIVE}) or delete it so it is downloaded again."
        )
    return tokens, lines


def token_digest(tokens: list[str]) -> str:
    """sha256 of the token stream joined by single spaces (whitespace-insensitive file identity)."""
    digest = hashlib.sha256()
    for start in range(0, len(tokens), 65536):
        digest.update(" ".join(tokens[start:start + 65536]).encode("utf-8"))
        digest.update(b" ")
    return digest.hexdigest()


def verify_tokens(source: str, split: Split, tokens: list[str], lines: int) -> None:
    """Check a split against :data:`FILES`; a mismatch raises naming the source, the values found and expected."""
    spec = FILES[split]
    found: dict[str, Any] = {"lines": lines, "tokens": len(tokens)}
    expected: dict[str, Any] = {"lines": spec.lines, "tokens": spec.tokens}
    if spec.types is not None:
        found["types"], expected["types"] = len(set(tokens)), spec.types
    if spec.token_sha256 is not None:
        found["token_sha256"], expected["token_sha256"] = token_digest(tokens), spec.token_sha256
    bad = {k: (found[k], expected[k]) for k in expected if found[k] != expected[k]}
    if bad:
        detail = ", ".join(f"{k} {v[0]} (expected {v[1]})" for k, v in bad.items())
        raise ValueError(
            f"{source} is not the WikiText-2 v1 {split} split: {detail}. Delete it and download again, or copy "
            f"{file_name(split)} from the official archive {OFFICIAL_ARCHIVE}."
        )


def download_split(data_dir: Path, split: Split, mirror: str = MIRROR) -> Path:
    """Fetch ``split`` from the mirror into ``data_dir/wiki.{split}.tokens`` and verify it.

    The file is written to a temporary name and renamed once verified, so concurrent processes (one per device) and
    interrupted downloads never leave a partial file under the real name.
    """
    target = data_dir / file_name(split)
    url = f"{mirror}/{FILES[split].mirror_name}"
    data_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=data_dir, prefix=f".{target.name}.")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        tokens, lines = read_tokens(tmp)
        verify_tokens(f"{target} (downloaded from {url})", split, tokens, lines)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def missing_files_message(data_dir: Path, missing: list[Split], reason: str) -> str:
    """What is missing, what is expected, where to get it."""
    names = ", ".join(file_name(s) for s in missing)
    return (
        f"WikiText-2 files missing in {data_dir.resolve()}: {names} ({reason}). Expected wiki.train.tokens, "
        f"wiki.valid.tokens and wiki.test.tokens (WikiText-2 v1, word level). Get them from {MIRROR}/"
        f"{{train,valid,test}}.txt (rename to wiki.<split>.tokens) or from the official archive {OFFICIAL_ARCHIVE}, "
        "and put them in data_dir; or set download=True on a machine that is online."
    )


class Vocabulary:
    """Words to ids in order of first occurrence (AWD-LSTM's ``Dictionary``); ``<unk>`` is always present."""

    def __init__(self, words: list[str]) -> None:
        self.itos: list[str] = []
        self.stoi: dict[str, int] = {}
        for word in words:
            if word not in self.stoi:
                self.stoi[word] = len(self.itos)
                self.itos.append(word)
        if UNK not in self.stoi:
            self.stoi[UNK] = len(self.itos)
            self.itos.append(UNK)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> tuple[Tensor, int]:
        """``(ids, number of out-of-vocabulary tokens mapped to <unk>)``."""
        unk = self.stoi[UNK]
        ids = [self.stoi.get(t, -1) for t in tokens]
        oov = ids.count(-1)
        out = torch.tensor(ids, dtype=torch.long)
        if oov:
            out[out < 0] = unk
        return out, oov


class TokenBatch(NamedTuple):
    """One window of every stream, time first (``(seq_len, streams)``, the layout of ``torch.nn.LSTM``)."""

    inputs: Tensor
    targets: Tensor
    #: the nominal BPTT length; AWD-LSTM scales the step's lr by ``seq_len / bptt``
    bptt: int


def sample_seq_lens(num: int, bptt: int, budget: int, generator: torch.Generator) -> list[int]:
    """``num`` AWD-LSTM sequence lengths summing to at most ``budget``.

    Each is ``N(bptt, 5)`` with probability 0.95, else ``N(bptt / 2, 5)``, at least 5 (awd-lstm-lm ``main.py`` and
    fastai 0.7's ``LanguageModelLoader``). The cap at ``bptt + 40`` is this project's guard against a runaway window
    (neither source has one; it lies 8 standard deviations out, so it never binds at the recipe's bptt). Draws that
    overrun the stream are redrawn, so every epoch has the same number of windows.
    """
    for _ in range(1000):
        half = torch.rand(num, generator=generator) >= 0.95
        mean = torch.where(half, bptt / 2.0, float(bptt))
        lens = (mean + 5.0 * torch.randn(num, generator=generator)).long().clamp(5, bptt + 40)
        if int(lens.sum()) <= budget:
            return lens.tolist()
    raise RuntimeError(f"Could not draw {num} windows of mean length ~{bptt} within {budget} tokens.")


class TrainWindows:
    """Variable-length windows over parallel streams; one pass is one epoch.

    Args:
        streams: ``(length, streams)`` token ids, this device's streams.
        bptt: nominal window length.
        variable: AWD-LSTM's random lengths; ``False`` gives windows of exactly ``bptt``.
        seed: lengths and the start offset of epoch ``e`` come from a generator seeded with ``seed + e``; every
            device uses the same draws, so all take the same number of steps.
    """

    def __init__(self, streams: Tensor, bptt: int, variable: bool, seed: int) -> None:
        self.streams, self.bptt, self.variable, self.seed = streams, bptt, variable, seed
        self.epoch = 0
        self.num_windows = (streams.size(0) - 1) // bptt

    def __len__(self) -> int:
        return self.num_windows

    def windows(self, epoch: int) -> list[tuple[int, int]]:
        """``(start, seq_len)`` of every window of ``epoch``."""
        budget = self.streams.size(0) - 1
        if not self.variable:
            return [(i * self.bptt, self.bptt) for i in range(self.num_windows)]
        generator = torch.Generator().manual_seed(self.seed + epoch)
        lens = sample_seq_lens(self.num_windows, self.bptt, budget, generator)
        # the tokens the windows leave over go to a random place, so no part of a stream is always skipped
        start = int(torch.randint(budget - sum(lens) + 1, (1,), generator=generator))
        out = []
        for n in lens:
            out.append((start, n))
            start += n
        return out

    def __iter__(self) -> Iterator[TokenBatch]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        for start, n in self.windows(epoch):
            yield TokenBatch(self.streams[start:start + n], self.streams[start + 1:start + n + 1], self.bptt)


class EvalWindows:
    """Fixed windows over ``(length + 1, streams)`` inputs/targets covering every prediction once."""

    def __init__(self, inputs: Tensor, targets: Tensor, bptt: int) -> None:
        self.inputs, self.targets, self.bptt = inputs, targets, bptt

    def __len__(self) -> int:
        return math.ceil(self.inputs.size(0) / self.bptt)

    def __iter__(self) -> Iterator[TokenBatch]:
        for start in range(0, self.inputs.size(0), self.bptt):
            yield TokenBatch(self.inputs[start:start + self.bptt], self.targets[start:start + self.bptt], self.bptt)


def train_streams(ids: Tensor, batch_size: int, rank: int, world_size: int) -> Tensor:
    """AWD-LSTM's ``batchify`` over ``batch_size * world_size`` streams; the columns of ``rank``."""
    total = batch_size * world_size
    length = ids.numel() // total
    data = ids[: length * total].view(total, length).t().contiguous()
    return data[:, rank * batch_size:(rank + 1) * batch_size]


def eval_streams(ids: Tensor, batch_size: int, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
    """Inputs and targets of every prediction in ``ids`` as ``batch_size * world_size`` streams, padded at the end."""
    total = batch_size * world_size
    predictions = ids.numel() - 1
    length = math.ceil(predictions / total)
    inputs = torch.zeros(total * length, dtype=torch.long)
    targets = torch.full((total * length,), IGNORE_INDEX, dtype=torch.long)
    inputs[:predictions] = ids[:-1]
    targets[:predictions] = ids[1:]
    cols = slice(rank * batch_size, (rank + 1) * batch_size)
    return (inputs.view(total, length).t()[:, cols].contiguous(), targets.view(total, length).t()[:, cols].contiguous())


class WikiText2(LightningDataModule):
    """WikiText-2 v1, word level, for AWD-LSTM and QRNN language models.

    Args:
        data_dir: folder holding ``wiki.{train,valid,test}.tokens``.
        download: fetch missing files from the mirror (:data:`MIRROR`), verified against :data:`FILES`.
        train_split: the split trained on; ``"valid"`` lets the validation file stand in where the train file is
            absent (tests, quick runs). The vocabulary is built on it.
        val_split: the split validated on.
        test_split: the split tested on.
        batch_size: parallel training streams per device (recipe: 100).
        bptt: nominal training window (recipe: 70).
        variable_bptt: AWD-LSTM's random window lengths.
        eval_batch_size: parallel evaluation streams per device (published protocol: 1).
        eval_bptt: evaluation window; ``None`` uses ``bptt``.
        seed: seed of the window lengths (epoch ``e`` uses ``seed + e``).

    The vocabulary is built in ``setup``, before the Trainer builds the model (``configure_model``). Under DDP each
    device takes its own streams: for training ``batch_size`` of ``batch_size * world_size``, for
    evaluation ``eval_batch_size`` of ``eval_batch_size * world_size`` (a stream's first word is predicted without
    context, so 1 device and ``eval_batch_size=1`` is the exact published protocol).
    """

    def __init__(
        self,
        data_dir: str = "data/wikitext-2",
        download: bool = True,
        train_split: Split = "train",
        val_split: Split = "valid",
        test_split: Split = "test",
        batch_size: int = 100,
        bptt: int = 70,
        variable_bptt: bool = True,
        eval_batch_size: int = 1,
        eval_bptt: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("bptt", bptt), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"WikiText2 {name} must be a positive integer, got {value}.")
        if bptt < 5:
            raise ValueError(f"WikiText2 bptt must be at least 5 (AWD-LSTM's shortest window), got {bptt}.")
        if eval_bptt is not None and eval_bptt < 1:
            raise ValueError(f"WikiText2 eval_bptt must be positive or None (use bptt), got {eval_bptt}.")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.download = download
        self.splits: dict[str, Split] = {"train": train_split, "valid": val_split, "test": test_split}
        self.batch_size, self.bptt, self.variable_bptt = batch_size, bptt, variable_bptt
        self.eval_batch_size = eval_batch_size
        self.eval_bptt = bptt if eval_bptt is None else eval_bptt
        self.seed = seed
        self._vocab: Vocabulary | None = None
        self._train_tokens: list[str] | None = None
        self._ids: dict[Split, Tensor] = {}
        #: fraction of each split's tokens that were out of vocabulary (mapped to ``<unk>``), filled by ``setup``
        self.oov_rate: dict[Split, float] = {}
        self._train_epoch = 0
        self._train_windows: TrainWindows | None = None

    @property
    def vocab(self) -> Vocabulary:
        """The vocabulary, settled by ``setup``."""
        if self._vocab is None:
            raise RuntimeError(
                "WikiText2's vocabulary is settled in setup(): call dm.prepare_data() and dm.setup('fit') (the Trainer "
                "does both before it builds the model)."
            )
        return self._vocab

    @vocab.setter
    def vocab(self, vocab: Vocabulary) -> None:
        self._vocab = vocab

    @property
    def vocab_size(self) -> int:
        """Number of words in the vocabulary (``<eos>`` and ``<unk>`` included); known after ``setup``."""
        return len(self.vocab)

    def path(self, split: Split) -> Path:
        """Where ``split`` is read from."""
        return self.data_dir / file_name(split)

    def prepare_data(self) -> None:
        """Download the missing files when ``download`` is on (the Trainer calls this once per node)."""
        self._ensure_files(self.download)

    def _ensure_files(self, download: bool) -> None:
        needed = sorted(set(self.splits.values()), key=list(FILES).index)
        missing = [s for s in needed if not self.path(s).is_file()]
        if not missing:
            return
        if not download:
            reason = "download=False" if not self.download else "prepare_data() was not called"
            raise FileNotFoundError(missing_files_message(self.data_dir, missing, reason))
        for split in missing:
            try:
                download_split(self.data_dir, split)
            except OSError as err:  # offline, refused, timed out (urllib's URLError is an OSError)
                raise FileNotFoundError(
                    missing_files_message(self.data_dir, missing, f"download from {MIRROR} failed: {err}")
                ) from err

    def _encode(self, split: Split) -> Tensor:
        if split not in self._ids:
            if split == self.splits["train"] and self._train_tokens is not None:
                tokens = self._train_tokens
            else:
                tokens, _ = read_tokens(self.path(split))
            ids, oov = self.vocab.encode(tokens)
            self._ids[split] = ids
            self.oov_rate[split] = oov / len(tokens)
            rank_zero_info(
                f"WikiText2: {self.path(split)}: {len(tokens):,} tokens, {oov:,} ({100 * oov / len(tokens):.2f}%) "
                f"out of the {len(self.vocab):,}-word vocabulary, mapped to {UNK}"
            )
        return self._ids[split]

    def _check_length(self, split: Split, ids: Tensor, streams: int, bptt: int) -> None:
        if ids.numel() - 1 < streams * bptt:
            raise ValueError(
                f"{self.path(split)} has {ids.numel():,} tokens: shorter than one BPTT window of {bptt} tokens on "
                f"each of {streams} streams ({streams * bptt + 1:,} tokens needed). Use a longer file, or lower "
                "bptt / batch_size / eval_batch_size."
            )

    def _settle_vocabulary(self) -> None:
        """Build the vocabulary on the training split (a checkpoint's replaces it in ``load_state_dict``)."""
        if self._vocab is not None:
            return
        tokens, _ = read_tokens(self.path(self.splits["train"]))
        self.vocab = Vocabulary(tokens)
        self._train_tokens = tokens

    def setup(self, stage: str | None = None) -> None:
        self._ensure_files(download=False)
        self._settle_vocabulary()
        rank, world = rank_world(self.trainer)
        train, evaluation = (self.batch_size, self.bptt), (self.eval_batch_size, self.eval_bptt)
        checks = {
            "train": (("fit",), train), "valid": (("fit", "validate"), evaluation), "test": (("test",), evaluation)
        }
        for key, (stages, (streams, bptt)) in checks.items():
            if stage is None or stage in stages:
                split = self.splits[key]
                self._check_length(split, self._encode(split), streams * world, bptt)
        self._train_tokens = None

    def _eval_loader(self, key: str) -> EvalWindows:
        rank, world = rank_world(self.trainer)
        split = self.splits[key]
        inputs, targets = eval_streams(self._encode(split), self.eval_batch_size, rank, world)
        return EvalWindows(inputs, targets, self.eval_bptt)

    # The loaders are plain iterables of ready batches (Lightning accepts any iterable with a length): the windows are
    # slices of one tensor in memory, so a DataLoader's workers and collation would only add copies, and Lightning
    # leaves non-DataLoader iterables alone under DDP, where each device already reads its own streams.
    def train_dataloader(self) -> TrainWindows:
        # built here rather than in setup: a checkpoint's vocabulary is restored between the two
        rank, world = rank_world(self.trainer)
        epoch = self._train_windows.epoch if self._train_windows is not None else self._train_epoch
        streams = train_streams(self._encode(self.splits["train"]), self.batch_size, rank, world)
        self._train_windows = TrainWindows(streams, self.bptt, self.variable_bptt, self.seed)
        self._train_windows.epoch = epoch
        return self._train_windows

    def val_dataloader(self) -> EvalWindows:
        return self._eval_loader("valid")

    def test_dataloader(self) -> EvalWindows:
        return self._eval_loader("test")

    def state_dict(self) -> dict[str, Any]:
        """The vocabulary (so a checkpoint is evaluated with the words it was trained on) and the epoch of the
        window draws (so a resumed run continues the same sequence of lengths)."""
        epoch = self._train_windows.epoch if self._train_windows is not None else self._train_epoch
        return {"vocab": list(self.vocab.itos), "train_epoch": epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        itos = list(state_dict["vocab"])
        if self._vocab is None:
            self.vocab = Vocabulary(itos)
        elif itos != self.vocab.itos:
            rank_zero_warn(
                f"WikiText2: the checkpoint's vocabulary ({len(itos):,} words) differs from the one built on "
                f"{self.path(self.splits['train'])} ({len(self.vocab):,} words); using the checkpoint's."
            )
            self.vocab = Vocabulary(itos)
            self._ids.clear()
            self.oov_rate.clear()
        self._train_epoch = int(state_dict.get("train_epoch", 0))
        if self._train_windows is not None:
            self._train_windows.epoch = self._train_epoch
