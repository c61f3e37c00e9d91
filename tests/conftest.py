"""Shared fixtures: the real data in ../shared/data (found through a setting, never the network)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: Setting that points the tests at the shared real data; .ci/run sets it, the default is the checkout's sibling.
SHARED_DATA_ENV = "LIGHTNING_ADAMW_SHARED_DATA"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder holding cifar10/, wikitext-2/ and stanford_cars/ (read-only)."""
    path = Path(os.environ.get(SHARED_DATA_ENV, ROOT.parent / "shared" / "data")).resolve()
    if not (path / "README.md").is_file():
        pytest.fail(f"Shared data not found at {path}: set {SHARED_DATA_ENV} to the folder with cifar10/ etc.")
    return path


_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared CPU, OpenMP threads stall whenever another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: connections to anything but loopback (DDP's gloo) raise at once."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in _LOCAL_HOSTS and not str(host).startswith("127."):
            raise OSError(f"tests must not use the network (tried to connect to {address})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("TORCH_HOME", str(ROOT / ".pytest_cache" / "torch_home"))
