"""SIGTERM / SIGINT: a checkpoint at the next step boundary, a clean exit, and an exact resume (subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "_interrupt_run.py"


def run(out: Path, mode: str, accumulate: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    return subprocess.run([sys.executable, str(SCRIPT), str(out), mode, str(accumulate)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("signum, accumulate", [(signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_kill_resume_equals_uninterrupted(tmp_path: Path, signum: int, accumulate: int) -> None:
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir()
    cut_dir.mkdir()
    done = run(full_dir, "full", accumulate)
    assert done.returncode == 0, done.stderr[-2000:]

    env = dict(os.environ, PYTHONPATH=str(TESTS))
    child = subprocess.Popen([sys.executable, str(SCRIPT), str(cut_dir), "run", str(accumulate)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line.strip() == "STEP 5":
            child.send_signal(signum)
            break
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-2000:]
    assert "received: saving a checkpoint at the next optimizer step" in err
    assert (cut_dir / "ckpt" / "last.ckpt").exists() and not (cut_dir / "run.pt").exists()
    stopped_at = torch.load(cut_dir / "ckpt" / "last.ckpt", weights_only=False)["global_step"]
    assert 5 <= stopped_at < 24 // accumulate

    resumed = run(cut_dir, "resume", accumulate)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full, cont = torch.load(full_dir / "full.pt"), torch.load(cut_dir / "resume.pt")
    assert cont["steps"] == full["steps"][stopped_at:]
    assert cont["lrs"] == full["lrs"][stopped_at:] and cont["momenta"] == full["momenta"][stopped_at:]
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(cont["state_dict"][key], value, rtol=0, atol=0, msg=key)
