"""WikiText-2 loading on the real files in ../shared/data (valid standing in for the absent train split)."""

from __future__ import annotations

import io
import logging
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch

from datamodules import wikitext2
from datamodules.wikitext2 import (
    EOS,
    IGNORE_INDEX,
    UNK,
    TrainWindows,
    Vocabulary,
    WikiText2,
    eval_streams,
    read_tokens,
    sample_seq_lens,
    train_streams,
    verify_tokens,
)


@pytest.fixture(scope="module")
def wt2(shared_data: Path) -> Path:
    return shared_data / "wikitext-2"


@pytest.fixture(scope="module")
def valid_as_train(wt2: Path) -> WikiText2:
    dm = WikiText2(str(wt2), download=False, train_split="valid", val_split="test", batch_size=8, bptt=35)
    dm.setup("fit")
    return dm


def test_tokens_match_the_published_counts_and_checksums(wt2: Path) -> None:
    for split, lines, count in (("valid", 3_760, 217_646), ("test", 4_358, 245_569)):
        tokens, n_lines = read_tokens(wt2 / f"wiki.{split}.tokens")
        assert (n_lines, len(tokens)) == (lines, count)
        assert tokens.count(EOS) == lines
        verify_tokens(str(wt2 / f"wiki.{split}.tokens"), split, tokens, n_lines)  # the pinned digests


def test_vocabulary_is_built_on_the_train_split_and_oov_is_reported(
    wt2: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = WikiText2(str(wt2), download=False, train_split="valid", val_split="valid", test_split="test")
    with pytest.raises(RuntimeError, match=r"settled in setup\(\)"):  # Lightning's contract: data is read in setup
        _ = dm.vocab_size
    dm.prepare_data()  # nothing to download
    dm.setup("fit")
    valid_tokens, _ = read_tokens(wt2 / "wiki.valid.tokens")
    test_tokens, _ = read_tokens(wt2 / "wiki.test.tokens")
    assert dm.vocab_size == len(set(valid_tokens)) == 13_777  # <unk> and <eos> are words of WikiText
    assert dm.vocab.itos[:3] == [EOS, "=", "Homarus"]  # order of first occurrence (AWD-LSTM's Dictionary)
    known = set(valid_tokens)
    expected_oov = sum(t not in known for t in test_tokens)
    with caplog.at_level(logging.INFO):
        dm.setup()
    assert dm.oov_rate["valid"] == 0.0
    assert dm.oov_rate["test"] == pytest.approx(expected_oov / len(test_tokens))
    assert "wiki.test.tokens: 245,569 tokens, 11,896 (4.84%) out of the 13,777-word vocabulary" in caplog.text
    ids = dm._encode("test")
    unk = dm.vocab.stoi[UNK]
    decoded = [dm.vocab.itos[i] for i in ids[:2000].tolist()]
    assert decoded == [t if t in known else UNK for t in test_tokens[:2000]]
    assert int((ids == unk).sum()) == expected_oov + test_tokens.count(UNK)


def test_training_windows_follow_awd_lstm(valid_as_train: WikiText2) -> None:
    dm = valid_as_train
    windows = dm.train_dataloader()
    streams = windows.streams
    assert streams.shape == (217_646 // 8, 8)
    assert torch.equal(streams[:, 1], dm._encode("valid")[streams.size(0):2 * streams.size(0)])
    epochs = []
    for epoch in range(2):
        spec = windows.windows(epoch)
        batches = list(windows)
        assert len(batches) == len(spec) == len(windows) == (streams.size(0) - 1) // 35  # same count every epoch
        for (start, n), batch in zip(spec, batches):
            assert 5 <= n <= 35 + 40 and batch.bptt == 35
            # inputs and targets are the same slice of every stream, one token apart
            assert torch.equal(batch.inputs, streams[start:start + n])
            assert torch.equal(batch.targets, streams[start + 1:start + n + 1])
        # windows follow each other (so the carried hidden state is the right one) and stay inside the streams
        assert all(a + n == b for (a, n), (b, _) in zip(spec, spec[1:]))
        assert spec[-1][0] + spec[-1][1] + 1 <= streams.size(0)
        epochs.append([n for _, n in spec])
    assert epochs[0] != epochs[1]  # a new draw every epoch
    assert len(set(epochs[0])) > 5  # variable length
    assert dm.state_dict()["train_epoch"] == 2


def test_sequence_lengths_have_the_awd_lstm_distribution() -> None:
    lens = torch.tensor(sample_seq_lens(20_000, 70, 10**9, torch.Generator().manual_seed(0)), dtype=torch.float)
    short = lens < 52  # N(35, 5) draws; N(70, 5) falls below 52 with probability ~1e-4
    assert short.float().mean().item() == pytest.approx(0.05, abs=0.006)
    assert lens[~short].mean().item() == pytest.approx(69.5, abs=0.2)  # int() truncates: mean 70 - 0.5
    assert lens[~short].std().item() == pytest.approx(5.0, abs=0.2)
    assert lens.min() >= 5 and lens.max() <= 110
    again = sample_seq_lens(20_000, 70, 10**9, torch.Generator().manual_seed(0))
    assert again == lens.long().tolist()


def test_streams_are_split_between_devices() -> None:
    ids = torch.arange(1000)
    whole = train_streams(ids, batch_size=6, rank=0, world_size=1)
    assert whole.shape == (166, 6) and torch.equal(whole[:, 1], torch.arange(166, 332))
    ranks = [train_streams(ids, batch_size=3, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat(ranks, 1), whole)  # disjoint streams, together the single-device batch
    # every device draws the same window lengths, so all take the same number of steps (DDP would hang otherwise)
    draws = [TrainWindows(streams, 20, True, seed=7).windows(3) for streams in ranks]
    assert draws[0] == draws[1]
    # evaluation: every prediction exactly once across devices and streams, padding ignored
    for batch_size, world in ((1, 1), (3, 1), (2, 2), (7, 3)):
        inputs, targets = zip(*(eval_streams(ids, batch_size, r, world) for r in range(world)))
        inputs, targets = torch.cat(inputs, 1).t().flatten(), torch.cat(targets, 1).t().flatten()
        counted = targets != IGNORE_INDEX
        assert torch.equal(inputs[counted], ids[:-1]) and torch.equal(targets[counted], ids[1:])
        assert int(counted.sum()) == 999


def test_missing_files_say_what_is_expected_and_where(tmp_path: Path) -> None:
    dm = WikiText2(str(tmp_path / "wt2"), download=False)  # builds nothing: the files are looked for by the hooks
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match="download=False"):
        dm.setup("fit")
    message = str(err.value)
    for expected in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens", wikitext2.MIRROR, "download=False"):
        assert expected in message


@pytest.mark.parametrize("content", ["", "   \n \n\t\n"])
def test_empty_or_blank_file_is_named(tmp_path: Path, wt2: Path, content: str) -> None:
    shutil.copy(wt2 / "wiki.valid.tokens", tmp_path / "wiki.valid.tokens")
    (tmp_path / "wiki.test.tokens").write_text(content)
    dm = WikiText2(str(tmp_path), download=False, train_split="valid")
    with pytest.raises(ValueError, match=r"wiki\.test\.tokens is empty or holds only whitespace"):
        dm.setup("test")


def test_split_shorter_than_one_window_is_named(tmp_path: Path) -> None:
    (tmp_path / "wiki.valid.tokens").write_text(" = Tiny = \n a few words only here \n")
    with pytest.raises(ValueError, match=r"wiki\.valid\.tokens has 10 tokens: shorter than one BPTT window of 35"):
        only_valid = {"train_split": "valid", "val_split": "valid", "test_split": "valid"}
        WikiText2(str(tmp_path), download=False, batch_size=1, bptt=35, **only_valid).setup("fit")


class _FakeWeb:
    """Serves files by URL as ``urllib.request.urlopen`` would (the tests never touch the network)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.requested = files, []

    def __call__(self, url: str, timeout: float) -> io.BytesIO:
        self.requested.append(url)
        if url not in self.files:
            raise urllib.error.URLError("offline")
        return io.BytesIO(self.files[url])


def test_download_fetches_missing_files_and_verifies_them(
    tmp_path: Path, wt2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    web = _FakeWeb({f"{wikitext2.MIRROR}/{s}.txt": (wt2 / f"wiki.{s}.tokens").read_bytes() for s in ("valid", "test")})
    monkeypatch.setattr(wikitext2.urllib.request, "urlopen", web)
    shutil.copy(wt2 / "wiki.valid.tokens", tmp_path / "wiki.train.tokens")  # present: not fetched
    dm = WikiText2(str(tmp_path), download=True)
    assert web.requested == []  # nothing is fetched on construction (it would run on every DDP rank)
    with pytest.raises(FileNotFoundError, match=r"prepare_data\(\) was not called"):
        dm.setup("fit")
    dm.prepare_data()
    dm.setup("fit")
    assert web.requested == [f"{wikitext2.MIRROR}/valid.txt", f"{wikitext2.MIRROR}/test.txt"]
    assert (tmp_path / "wiki.test.tokens").read_bytes() == (wt2 / "wiki.test.tokens").read_bytes()
    assert dm.vocab_size == 13_777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]


def test_download_rejects_a_wrong_file_and_leaves_nothing(
    tmp_path: Path, wt2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    valid = (wt2 / "wiki.valid.tokens").read_bytes()
    corrupted = valid.replace(b"lobster", b"crab")
    web = _FakeWeb({f"{wikitext2.MIRROR}/train.txt": valid, f"{wikitext2.MIRROR}/valid.txt": corrupted})
    monkeypatch.setattr(wikitext2.urllib.request, "urlopen", web)
    with pytest.raises(ValueError, match=r"is not the WikiText-2 v1 train split: lines 3760 \(expected 36718\), tokens "
                                         r"217646 \(expected 2088628\)"):
        WikiText2(str(tmp_path / "a"), download=True).prepare_data()
    with pytest.raises(ValueError, match=r"valid\.txt\) is not the WikiText-2 v1 valid split: .*token_sha256"):
        WikiText2(str(tmp_path / "b"), download=True, train_split="valid", val_split="valid",
                  test_split="valid").prepare_data()
    assert list((tmp_path / "a").iterdir()) == [] and list((tmp_path / "b").iterdir()) == []


def test_offline_download_explains_how_to_get_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wikitext2.urllib.request, "urlopen", _FakeWeb({}))
    with pytest.raises(FileNotFoundError, match=r"download from .* failed: <urlopen error offline>") as err:
        WikiText2(str(tmp_path), download=True).prepare_data()
    assert wikitext2.OFFICIAL_ARCHIVE in str(err.value)


def test_vocabulary_travels_with_the_checkpoint(valid_as_train: WikiText2, wt2: Path, tmp_path: Path) -> None:
    state = valid_as_train.state_dict()
    assert state["vocab"] == valid_as_train.vocab.itos
    # a datamodule whose train file differs (here: the test file) evaluates with the checkpoint's words
    shutil.copy(wt2 / "wiki.test.tokens", tmp_path / "wiki.train.tokens")
    shutil.copy(wt2 / "wiki.test.tokens", tmp_path / "wiki.test.tokens")
    other = WikiText2(str(tmp_path), download=False, val_split="test")
    other.setup("fit")
    assert other.vocab_size == 14_143
    with pytest.warns(UserWarning, match="checkpoint's vocabulary"):
        other.load_state_dict(state)
    assert other.vocab_size == 13_777
    other.setup("test")
    assert torch.equal(other._encode("test"), valid_as_train._encode("test"))


def test_vocabulary_always_has_unk() -> None:
    vocab = Vocabulary(["a", "b", "a", EOS])
    assert vocab.itos == ["a", "b", EOS, UNK]
    ids, oov = vocab.encode(["b", "zzz", "a"])
    assert ids.tolist() == [1, 3, 0] and oov == 1


def test_bad_arguments_are_rejected(wt2: Path) -> None:
    with pytest.raises(ValueError, match="bptt must be at least 5"):
        WikiText2(str(wt2), download=False, train_split="valid", bptt=4)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        WikiText2(str(wt2), download=False, train_split="valid", batch_size=0)


def test_window_draws_are_reproducible() -> None:
    streams = torch.arange(4000).view(1000, 4)
    a, b = TrainWindows(streams, 35, True, seed=3), TrainWindows(streams, 35, True, seed=3)
    assert a.windows(5) == b.windows(5) and a.windows(5) != a.windows(6)
    fixed = TrainWindows(streams, 35, False, seed=3).windows(0)
    assert fixed == [(i * 35, 35) for i in range(28)]


def test_a_file_in_another_encoding_is_named(shared_data: Path, tmp_path: Path) -> None:
    text = (shared_data / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    bad = tmp_path / "wiki.valid.tokens"
    bad.write_bytes(text.encode("utf-16"))  # what a Windows editor's "Unicode" saves
    with pytest.raises(ValueError, match=f"WikiText-2 file {bad} is not UTF-8 text .* at byte 0, line 1"):
        read_tokens(bad)
    first = next(i for i, c in enumerate(text) if 127 < ord(c) < 256)  # the first byte Latin-1 writes >= 0x80
    line = 1 + text[:first].count("\n")
    bad.write_bytes(text.encode("latin-1", errors="replace"))
    with pytest.raises(ValueError, match=f"is not UTF-8 text .*, line {line}\\)"):
        read_tokens(bad)
