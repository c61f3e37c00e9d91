"""``compare --launcher ray``: the grid as Ray Tune trials on a local 2-CPU Ray gives the local launcher's numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from test_compare import BASE, TESTS, VARIANTS

from lightning_adamw.experiments.compare import main


@pytest.fixture(scope="module")
def local_ray() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def layout(out: Path) -> set[str]:
    """The run folders' files, with TensorBoard's host- and time-stamped event file names made generic."""
    return {re.sub(r"events\.out\.tfevents\..*", "events", str(p.relative_to(out)))
            for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0] != "ray"}


def test_ray_grid_equals_the_local_launcher(local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "variants_tiny.yaml").write_text(yaml.safe_dump(VARIANTS))
    args = ["--config", str(tmp_path / "tiny.yaml"), "--variants", "adamw,adam_l2", "--seeds", "2",
            "--baseline", "adamw", "--trainer.max_epochs", "2"]
    on_ray = main([*args, "--out", str(tmp_path / "ray_out"), "--launcher", "ray", "--cpus_per_run", "1"])
    assert len(on_ray["runs"]) == 4 and {"results.md", "curves.png", "schedules.png"} <= layout(tmp_path / "ray_out")
    # two of the runs again with the local launcher, one of each variant: the same numbers and the same files
    local = main([*args, "--out", str(tmp_path / "local_out"), "--only", "adamw:1,adam_l2:0"])
    ray_runs = {(r["variant"], r["seed"]): r for r in on_ray["runs"]}
    for b in local["runs"]:
        a = ray_runs[b["variant"], b["seed"]]
        assert len(a["history"]) == 2 and a["history"] == b["history"] and a["test"] == b["test"]
        assert a["schedule"] == b["schedule"] and "test/loss" in a["test"]
        run = f"{b['variant']}/seed{b['seed']}"
        assert layout(tmp_path / "ray_out" / run) == layout(tmp_path / "local_out" / run)
    # the grid Ray ran is done for the local launcher too: every run skipped, the same table
    capsys.readouterr()
    again = main([*args, "--out", str(tmp_path / "ray_out")])
    assert capsys.readouterr().out.count("done earlier: skipped") == 4
    assert again["summary"] == on_ray["summary"]


def test_a_killed_ray_trial_resumes_when_the_command_is_repeated(tmp_path: Path) -> None:
    """A trial's training process gets SIGTERM mid-run (a preempted node): the grid stops with the message, the
    repeated command skips the finished run and resumes the killed one from its last.ckpt, under Ray again."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "variants_tiny.yaml").write_text(yaml.safe_dump(VARIANTS))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "lightning_adamw", "compare", "--config", str(tmp_path / "tiny.yaml"),
            "--variants", "adamw", "--seeds", "2", "--out", str(out), "--no_evaluate", "--trainer.max_epochs", "10",
            "--launcher", "ray", "--cpus_per_run", "1"]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "RAY_DEDUP_LOGS": "0"}
    runner = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    killed = False
    for line in runner.stdout:
        if not killed and "adamw seed 1] epoch 3/10" in line:
            config = str(out / "adamw" / "seed1" / "config.yaml")
            subprocess.run(["pkill", "-TERM", "-f", f"lightning_adamw fit --config {config}"], check=True)
            killed = True
    runner.wait(timeout=300)
    assert killed and runner.returncode != 0
    assert (out / "adamw" / "seed1" / "checkpoints" / "last.ckpt").exists()
    assert not (out / "adamw" / "seed1" / "result.json").exists()

    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "adamw seed 0] done earlier: skipped" in resumed.stdout
    assert "adamw seed 1] resuming from" in resumed.stdout + resumed.stderr
    run = json.loads((out / "adamw" / "seed1" / "result.json").read_text())
    steps = [s for s, _ in run["schedule"]["lr"]]
    assert len(run["history"]) == 10 and steps == sorted(set(steps)) and steps[-1] == 10 * 8 - 1
