"""The comparison runner: variants x seeds, skipped when done, resumed when interrupted, tables and plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_adamw.compare import deep_merge, main, markdown, summarise

TESTS = Path(__file__).resolve().parent

BASE = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu", "max_epochs": 3, "enable_progress_bar": False, "enable_model_summary": False,
        "log_every_n_steps": 1,
        "callbacks": [
            {"class_path": "lightning_adamw.OneCycleWD"},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"monitor": "val/loss", "mode": "min"}},
        ],
    },
    "model": {"class_path": "_tiny.TinyEvalModel",
              "init_args": {"optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1}}},
    "data": {"class_path": "_tiny.TinyResumableData"},
}
VARIANTS = {
    "applies_to": ["tiny.yaml"],
    "evaluate": {"trainer": {"limit_test_batches": 4}},
    "variants": {
        "adamw": {},
        "adam_l2": {"model": {"init_args": {"optimizer": {"name": "adam", "wd_mode": "l2", "weight_decay": 1e-4}}}},
    },
}


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "variants_tiny.yaml").write_text(yaml.safe_dump(VARIANTS))
    return tmp_path


def test_deep_merge() -> None:
    merged = deep_merge({"a": {"b": 1, "c": [1, 2]}, "d": 0}, {"a": {"c": [3], "e": None}})
    assert merged == {"a": {"b": 1, "c": [3], "e": None}, "d": 0}


def test_runs_every_variant_and_seed_then_skips_them(setup: Path, capsys: pytest.CaptureFixture) -> None:
    out = setup / "out"
    result = main(["--config", str(setup / "tiny.yaml"), "--variants", "adamw,adam_l2", "--seeds", "1",
                   "--out", str(out)])
    rows = {r["variant"]: r for r in result["summary"]}
    assert set(rows) == {"adamw", "adam_l2"} and all(r["runs"] == 1 and r["epochs"] == 3 for r in rows.values())
    assert "test/loss" in rows["adamw"]["test"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["metric"] == "val/loss" and len(saved["runs"]) == 2
    run = saved["runs"][0]
    assert len(run["history"]) == 3 and [s for s, _ in run["schedule"]["lr"]][:3] == [0, 1, 2]
    assert run["schedule"]["wd"][0][1] > 0  # decoupled decay applied and logged for adamw
    assert not any(r["schedule"].get("wd") for r in saved["runs"] if r["variant"] == "adam_l2")  # L2: no decoupled
    table = (out / "results.md").read_text()
    assert "| adamw | 1 |" in table and "±" in table
    for png in ("curves.png", "schedules.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # each run has its own TensorBoard folder and checkpoints
    assert (out / "adam_l2" / "seed0" / "checkpoints" / "last.ckpt").exists()
    assert list((out / "adam_l2" / "seed0" / "tb" / "fit").glob("events.out.tfevents.*"))
    capsys.readouterr()

    main(["--config", str(setup / "tiny.yaml"), "--variants", "adamw,adam_l2", "--seeds", "1", "--out", str(out)])
    assert capsys.readouterr().out.count("done earlier: skipped") == 2


def test_interrupted_run_resumes(setup: Path) -> None:
    out = setup / "out"
    args = [sys.executable, "-m", "lightning_adamw", "compare", "--config", str(setup / "tiny.yaml"),
            "--variants", "adamw", "--seeds", "1", "--out", str(out), "--no_evaluate", "--trainer.max_epochs", "60"]
    runner = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ), start_new_session=True)
    for line in runner.stdout:
        if "epoch 3/60" in line:
            os.killpg(runner.pid, signal.SIGTERM)
            break
    output = runner.communicate(timeout=120)[0]
    assert runner.returncode != 0 and "stopped before the end" in output and "Repeat the same command" in output
    assert (out / "adamw" / "seed0" / "checkpoints" / "last.ckpt").exists()

    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    run = json.loads((out / "adamw" / "seed0" / "result.json").read_text())
    steps = [s for s, _ in run["schedule"]["lr"]]
    assert len(run["history"]) == 60 and steps == sorted(set(steps)) and steps[-1] == 60 * 8 - 1


def test_unknown_variant_and_missing_config(setup: Path) -> None:
    with pytest.raises(SystemExit, match="Unknown variant.*available: adam_l2, adamw"):
        main(["--config", str(setup / "tiny.yaml"), "--variants", "adamm"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--config", str(setup / "nope.yaml"), "--variants", "adamw"])


def test_summary_and_table() -> None:
    runs = [{"variant": "a", "history": [0.5, 0.8], "epochs": 2, "wall_time_s": 10.0, "test": {"test/acc": 0.8}},
            {"variant": "a", "history": [0.6, 0.7], "epochs": 2, "wall_time_s": 12.0, "test": {"test/acc": 0.6}}]
    (row,) = summarise(runs, "val/acc", "max")
    assert row["final"] == pytest.approx((0.75, 0.0707107), rel=1e-5)
    assert row["best"] == pytest.approx((0.75, 0.0707107), rel=1e-5) and row["wall_time_s"] == 11.0
    assert "75.00% ± 7.07" in markdown([row], "val/acc", "cmd")
