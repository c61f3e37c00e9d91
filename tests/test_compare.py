"""The comparison runner: variants x seeds, skipped when done, resumed when interrupted, tables and plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_adamw.experiments.compare import load, main, parse_args
from lightning_adamw.experiments.report import markdown, plot
from lightning_adamw.experiments.results import summarise
from lightning_adamw.experiments.runs import deep_merge, describe_machine

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
    args = ["--config", str(setup / "tiny.yaml"), "--variants", "adamw,adam_l2", "--seeds", "1", "--out", str(out)]
    main([*args, "--only", "adam_l2:0"])  # one job-array task: that run only, no tables
    assert (out / "adam_l2" / "seed0" / "result.json").exists() and not (out / "adamw" / "seed0").exists()
    assert not (out / "results.md").exists()
    result = main([*args, "--baseline", "adamw", "--target", "10"])
    assert capsys.readouterr().out.count("done earlier: skipped") == 1
    rows = {r["variant"]: r for r in result["summary"]}
    assert set(rows) == {"adamw", "adam_l2"} and all(r["runs"] == 1 and r["epochs"] == 3 for r in rows.values())
    assert "test/loss" in rows["adamw"]["test"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["metric"] == "val/loss" and len(saved["runs"]) == 2
    run = saved["runs"][0]
    assert len(run["history"]) == 3 and [s for s, _ in run["schedule"]["lr"]][:3] == [0, 1, 2]
    assert run["history_epoch"] == [1.0, 2.0, 3.0]
    assert 0 < run["history_elapsed_s"][0] < run["history_elapsed_s"][1] < run["history_elapsed_s"][2]
    assert run["schedule"]["wd"][0][1] > 0  # decoupled decay applied and logged for adamw
    assert not any(r["schedule"].get("wd") for r in saved["runs"] if r["variant"] == "adam_l2")  # L2: no decoupled
    # every validation loss of these runs is below 10: reached at the first epoch, at its wall time
    assert rows["adamw"]["to_target"]["reached"] == 1 and rows["adamw"]["to_target"]["epoch"] == (1.0, None)
    assert rows["adamw"]["to_target"]["time_s"] == (run["history_elapsed_s"][0], None)
    table = (out / "results.md").read_text()
    rows_md = [line for line in table.splitlines() if line.startswith("| ada")]
    assert "| adamw | 1 |" in table and len(rows_md) == 2 and not any("±" in line for line in rows_md)  # one seed
    assert "| baseline |" in table and "(one seed: no interval)" in table and "epochs to 10" in table
    # where the wall times were measured: this machine, for every run
    assert all(r["machines"] == [describe_machine()] for r in saved["runs"])
    assert f"Wall times measured on: {describe_machine()}." in table
    for png in ("curves.png", "schedules.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # each run has its own TensorBoard folder and checkpoints
    assert (out / "adam_l2" / "seed0" / "checkpoints" / "last.ckpt").exists()
    assert list((out / "adam_l2" / "seed0" / "tb" / "fit").glob("events.out.tfevents.*"))


def test_interrupted_run_resumes_and_finished_runs_are_skipped(setup: Path) -> None:
    out = setup / "out"
    args = [sys.executable, "-m", "lightning_adamw", "compare", "--config", str(setup / "tiny.yaml"),
            "--variants", "adamw", "--seeds", "2", "--out", str(out), "--no_evaluate", "--trainer.max_epochs", "20"]
    runner = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ), start_new_session=True)
    for line in runner.stdout:
        if "adamw seed 1] epoch 3/20" in line:
            os.killpg(runner.pid, signal.SIGTERM)
            break
    output = runner.communicate(timeout=120)[0]
    assert runner.returncode != 0 and "stopped before the end" in output and "Repeat the same command" in output
    assert (out / "adamw" / "seed0" / "result.json").exists()
    assert (out / "adamw" / "seed1" / "checkpoints" / "last.ckpt").exists()
    assert not (out / "adamw" / "seed1" / "result.json").exists()

    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "adamw seed 0] done earlier: skipped" in resumed.stdout
    assert "adamw seed 1] resuming from" in resumed.stdout
    runs = [json.loads((out / "adamw" / f"seed{s}" / "result.json").read_text()) for s in (0, 1)]
    for run in runs:
        steps = [s for s, _ in run["schedule"]["lr"]]
        assert len(run["history"]) == 20 and steps == sorted(set(steps)) and steps[-1] == 20 * 8 - 1
        elapsed = run["history_elapsed_s"]
        assert all(a < b for a, b in zip(elapsed, elapsed[1:]))  # wall time summed over the two sessions
    # each training session's machine and seconds are kept; their sum is the run's wall time
    sessions = json.loads((out / "adamw" / "seed1" / "sessions.json").read_text())
    assert len(sessions) == 2 and {s["machine"] for s in sessions} == {describe_machine()}
    assert sum(s["seconds"] for s in sessions) == pytest.approx(runs[1]["wall_time_s"], abs=0.2)
    # the resumed run continues the same curve: both seeds' runs are deterministic, the interruption changes nothing
    assert runs[1]["epochs"] == runs[0]["epochs"]


def test_unfinished_run_without_its_checkpoint_starts_again_cleanly(setup: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """A run folder kept without its checkpoints (``*.ckpt`` is not committed, or was deleted) cannot resume: the
    new attempt starts from the first step, and the old attempt's curves and wall time are not mixed into its own."""
    out = setup / "out"
    args = ["--config", str(setup / "tiny.yaml"), "--variants", "adamw", "--seeds", "1", "--out", str(out),
            "--no_evaluate"]
    main(args)
    run_dir = out / "adamw" / "seed0"
    for name in ("result.json", "finished.json"):
        (run_dir / name).unlink()
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        ckpt.unlink()
    result = main(args)
    assert "starting again from the first step" in capsys.readouterr().out
    (run,) = result["runs"]
    assert run["history_epoch"] == [1.0, 2.0, 3.0] and len(json.loads((run_dir / "sessions.json").read_text())) == 1
    assert len(list((run_dir / "tb" / "fit").glob("events.out.tfevents.*"))) == 1


def test_variants_all_names_every_variant_of_the_file(setup: Path) -> None:
    args, _ = parse_args(["--config", str(setup / "tiny.yaml"), "--variants", "all"])
    written = yaml.safe_load((setup / "variants_tiny.yaml").read_text())["variants"]
    assert load(args).names == list(written) and set(written) == {"adamw", "adam_l2"}


def test_refuses_unknown_variants_seeds_and_missing_config(setup: Path) -> None:
    config = str(setup / "tiny.yaml")
    with pytest.raises(SystemExit, match="Unknown variant.*available: adam_l2, adamw"):
        main(["--config", config, "--variants", "adamm"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--config", str(setup / "nope.yaml"), "--variants", "adamw"])
    with pytest.raises(SystemExit, match="--baseline adam_l2 is not among --variants adamw"):
        main(["--config", config, "--variants", "adamw", "--baseline", "adam_l2"])
    with pytest.raises(SystemExit, match="--only adamw:5: not a variant:seed.*e.g. adamw:0"):
        main(["--config", config, "--variants", "adamw", "--seeds", "2", "--only", "adamw:5"])


def _run(variant: str, seed: int, history: list[float], **extra: object) -> dict:
    return {"variant": variant, "seed": seed, "history": history, "epochs": len(history), "wall_time_s": 10.0,
            "test": {}, **extra}


def test_summary_and_table() -> None:
    runs = [_run("a", 0, [0.5, 0.8], test={"test/acc": 0.8}), _run("a", 1, [0.6, 0.7], test={"test/acc": 0.6})]
    (row,) = summarise(runs, "val/acc", "max")
    assert row["final"] == pytest.approx((0.75, 0.0707107), rel=1e-5)
    assert row["best"] == pytest.approx((0.75, 0.0707107), rel=1e-5) and row["wall_time_s"] == 10.0
    table = markdown([row], "val/acc", "cmd")
    assert "75.00% ± 7.07" in table and "70.00% ± 14.14" in table  # final val/acc and test/acc


def test_baseline_gap_is_welchs_interval() -> None:
    """Oracle: Welch's t statistic, Welch-Satterthwaite degrees of freedom and the t quantile written out."""
    from scipy import stats

    a, b = [0.90, 0.93, 0.91, 0.95], [0.88, 0.89, 0.87]
    runs = [_run("base", i, [v]) for i, v in enumerate(b)] + [_run("new", i, [v]) for i, v in enumerate(a)]
    gap = {r["variant"]: r for r in summarise(runs, "val/acc", "max", baseline="base")}["new"]["vs_baseline"]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    diff, se = np.mean(a) - np.mean(b), np.sqrt(va + vb)
    half = stats.t.ppf(0.975, df) * se
    assert gap["diff"] == pytest.approx(diff) and gap["ci"] == pytest.approx([diff - half, diff + half])
    assert gap["p"] == pytest.approx(2 * stats.t.sf(diff / se, df))
    assert "p = " in markdown(summarise(runs, "val/acc", "max", baseline="base"), "val/acc", "cmd", "base")


def test_runs_without_an_evaluation_are_flagged_not_blank(tmp_path: Path) -> None:
    runs = [_run("a", 0, [0.5]), _run("a", 1, []), _run("b", 0, [])]
    rows = summarise(runs, "val/acc", "max", baseline="a", target=0.4)
    table = markdown(rows, "val/acc", "cmd", "a", 0.4)
    assert "| a | 1 of 2 (!) | 50.00% |" in table and "| b | 1 of 1 (!) | no evaluation (!) |" not in table
    assert "| b | 0 of 1 (!) | no evaluation (!) |" in table
    assert "a seed 1: no val/acc logged" in table and "b seed 0: no val/acc logged" in table
    assert len({line.count("|") for line in table.splitlines() if line.startswith("|")}) == 1  # every row complete
    plot(runs, "val/acc", tmp_path)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_time_to_target_with_and_without_tta() -> None:
    runs = [_run("a", 0, [0.5, 0.8, 0.9], history_tta=[0.6, 0.9, 0.95], history_epoch=[1.0, 2.0, 3.0],
                 history_elapsed_s=[10.0, 20.0, 30.0]),
            _run("a", 1, [0.5, 0.7, 0.85], history_tta=[0.5, 0.8, 0.9], history_epoch=[1.0, 2.0, 3.0],
                 history_elapsed_s=[12.0, 24.0, 36.0])]
    (row,) = summarise(runs, "val/acc", "max", target=0.9)
    assert row["to_target"] == {"reached": 1, "of": 2, "epoch": (3.0, None), "time_s": (30.0, None)}
    assert row["to_target_tta"]["reached"] == 2 and row["to_target_tta"]["epoch"] == pytest.approx(
        (2.5, np.std([2, 3], ddof=1)))
    assert row["to_target_tta"]["time_s"] == pytest.approx((28.0, np.std([20, 36], ddof=1)))
    table = markdown([row], "val/acc", "cmd", target=0.9)
    assert "| 3.00 (1/2) | 30.00 s (1/2) | 2.50 ± 0.71 (2/2) | 28.00 ± 11.31 s (2/2) |" in table
    # the final accuracy with TTA beside the plain one: mean of 0.95 and 0.9
    assert "| variant | runs | final val/acc | final val/acc_tta | best val/acc |" in table
    assert "| a | 2 | 87.50% ± 3.54 | 92.50% ± 3.54 | 87.50% ± 3.54 |" in table


def test_final_tta_is_the_last_validation_that_computed_it() -> None:
    # tta_last_epochs: the early validations log no TTA twin
    runs = [_run("a", 0, [0.5, 0.8, 0.9], history_tta=[None, 0.85, 0.93]),
            _run("a", 1, [0.5, 0.8, 0.9], history_tta=[None, None, 0.91])]
    (row,) = summarise(runs, "val/acc", "max", target=0.92)
    assert row["final_tta"] == pytest.approx((0.92, np.std([0.93, 0.91], ddof=1)))
    assert row["to_target_tta"]["reached"] == 1 and row["to_target_tta"]["epoch"] == (3.0, None)
    assert "final val/acc_tta" not in markdown(summarise([_run("b", 0, [0.5])], "val/acc", "max"), "val/acc", "c")
    (never,) = summarise(runs, "val/acc", "max", target=0.99)
    assert "never (0/2)" in markdown([never], "val/acc", "cmd", target=0.99)


def test_table_says_which_machine_each_runs_time_comes_from() -> None:
    runs = [_run("a", 0, [0.9], machines=["CPU X, 2 cores"]), _run("a", 1, [0.9], machines=["CPU Y, 2 cores"]),
            _run("b", 0, [0.9], machines=["CPU X, 2 cores", "CPU Y, 2 cores"]), _run("b", 1, [0.9])]
    table = markdown(summarise(runs, "val/acc", "max"), "val/acc", "cmd", results=runs)
    assert "(!) The runs' wall times come from 3 machines" in table
    assert "- CPU X, 2 cores: a seed 0, b seed 0\n" in table and "- CPU Y, 2 cores: a seed 1, b seed 0\n" in table
    assert "- not recorded: b seed 1" in table  # a result written before machines were recorded
    one = markdown(summarise(runs[:1], "val/acc", "max"), "val/acc", "cmd", results=runs[:1])
    assert "Wall times measured on: CPU X, 2 cores." in one and "(!)" not in one


def test_import_lightning_adamw_leaves_the_runner_out() -> None:
    """The plugin imports none of the runner's dependencies nor the zoo (beyond what Lightning itself imports)."""
    watched = ["matplotlib", "tensorboard", "yaml", "scipy", "ray", "models", "datamodules",
               "lightning_adamw.experiments"]
    probe = "import sys, json; import {}; print(json.dumps([m for m in {} if m in sys.modules]))"

    def imported(module: str) -> set[str]:
        done = subprocess.run([sys.executable, "-c", probe.format(module, watched)], capture_output=True, text=True,
                              check=True, cwd=TESTS.parent)
        return set(json.loads(done.stdout))

    assert imported("lightning_adamw") <= imported("lightning.pytorch")
    assert imported("lightning_adamw").isdisjoint({"tensorboard", "ray", "models", "datamodules",
                                                   "lightning_adamw.experiments"})
