"""One run of a comparison: its config, its training and evaluation subprocesses, its result file.

A run lives in ``<out>/<variant>/seed<seed>/``: ``config.yaml``, ``log.txt``, ``tb/fit`` and ``tb/evaluate``
(TensorBoard), ``checkpoints/last.ckpt``, ``sessions.json`` (the machine and seconds of each training session),
``finished.json`` once training ended normally and ``result.json`` once it was evaluated and read back. Both
launchers run :func:`execute` on a :class:`RunSpec`, so a run done by one is skipped by the other, and an interrupted
one resumes from its ``last.ckpt`` under either.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_adamw.experiments.progress import ELAPSED, EPOCH
from lightning_adamw.lognames import parse_group_metric_name

RUN_CONFIG = "config.yaml"
FINISHED = "finished.json"
RESULT = "result.json"
SESSIONS = "sessions.json"


class RunFailed(RuntimeError):
    """A run stopped before the end of its training, or its evaluation failed; the message says what to do."""


def deep_merge(base: Any, override: Any) -> Any:
    """``override`` merged into a copy of ``base``: dicts recursively, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            merged[key] = deep_merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def _callbacks(config: dict[str, Any]) -> list[dict[str, Any]]:
    trainer = config.setdefault("trainer", {})
    callbacks = trainer.get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    trainer["callbacks"] = callbacks
    return callbacks


#: the checkpoint callbacks a config may name (the runner points their folder into the run's own)
CHECKPOINT_CLASSES = ("ModelCheckpoint", "RunCheckpoint")


def _class_name(node: Any) -> str:
    return str(node.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(node, dict) else str(node)


def monitored(config: dict[str, Any]) -> tuple[str, str]:
    """The metric the config's ModelCheckpoint watches, and whether higher is better (``max``)."""
    for callback in _callbacks(config):
        args = callback.get("init_args", {}) if isinstance(callback, dict) else {}
        if _class_name(callback) in CHECKPOINT_CLASSES and args.get("monitor"):
            return args["monitor"], args.get("mode", "min")
    return "val/loss", "min"


def default_variants_file(config: Path) -> Path:
    """The variants file beside ``config`` (``variants/*.yaml`` or ``variants*.yaml``) whose ``applies_to`` names it."""
    for candidate in sorted(config.parent.glob("variants/*.yaml")) + sorted(config.parent.glob("variants*.yaml")):
        spec = yaml.safe_load(candidate.read_text()) or {}
        if config.name in spec.get("applies_to", []):
            return candidate
    raise SystemExit(f"No variants file beside {config} lists it under applies_to; pass --variants_file.")


def run_config(base: dict[str, Any], override: dict[str, Any], seed: int, run_dir: Path, label: str, index: int,
               total: int) -> dict[str, Any]:
    """The config of one run: variant overrides, seed, its own logger and checkpoint folder, the runner's hooks."""
    config = deep_merge(base, override)
    config["seed_everything"] = seed
    trainer = config.setdefault("trainer", {})
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                         "init_args": {"save_dir": str(run_dir), "name": "tb", "version": "fit"}}
    callbacks = _callbacks(config)
    checkpoints = [c for c in callbacks if _class_name(c) in CHECKPOINT_CLASSES]
    if not checkpoints:
        checkpoints = [{"class_path": "lightning_adamw.RunCheckpoint", "init_args": {}}]
        callbacks.append(checkpoints[0])
    for checkpoint in checkpoints:
        args = checkpoint.setdefault("init_args", {})
        args.update(dirpath=str(run_dir / "checkpoints"), save_last=True)
    if not any(_class_name(c) == "SaveOnInterrupt" for c in callbacks):
        callbacks.append({"class_path": "lightning_adamw.SaveOnInterrupt"})
    callbacks.append({"class_path": "lightning_adamw.experiments.progress.RunProgress",
                      "init_args": {"label": label, "index": index, "total": total,
                                    "finished_file": str(run_dir / FINISHED)}})
    return config


def evaluation_config(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The run's config for its final ``test``: the variants file's ``evaluate`` overrides, its own log version."""
    evaluate = deep_merge(config, overrides)
    evaluate["trainer"]["logger"]["init_args"]["version"] = "evaluate"
    evaluate["trainer"]["callbacks"] = [c for c in evaluate["trainer"]["callbacks"] if _class_name(c) != "RunProgress"]
    return evaluate


@dataclass
class RunSpec:
    """Everything a launcher needs to train and evaluate one run, wherever it executes (a Ray worker included).

    Args:
        variant, seed: the run's variant name and seed.
        index, total: its position in the comparison, for progress lines.
        run_dir: its folder (absolute, on storage every worker sees).
        config: the fit config (variant merged in, logger, checkpoints, RunProgress).
        evaluate: overrides for the final ``test``, or ``None`` for no evaluation.
        extra: command-line arguments passed to every ``fit`` and ``test``.
        metric: the validation metric the tables use.
        workdir: where the CLI runs (the checkout root, so the zoo's short class names resolve).
        env: environment variables for the subprocesses (``PYTHONPATH``).
    """

    variant: str
    seed: int
    index: int
    total: int
    run_dir: str
    config: dict[str, Any]
    evaluate: dict[str, Any] | None
    extra: list[str]
    metric: str
    workdir: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}"

    @property
    def done(self) -> bool:
        return (Path(self.run_dir) / RESULT).exists()

    def say(self, message: str) -> None:
        print(f"[compare {self.index}/{self.total} | {self.label}] {message}", flush=True)


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard run as ``tag -> [(step, value)]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not log_dir.exists():
        return {}
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def describe_machine() -> str:
    """One line naming what a run's wall time was measured on: CPU model and cores, GPU if any, torch version."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        text += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{text}, torch {torch.__version__}"


def _subprocess(args: list[str], log: Path, run: RunSpec) -> int:
    """Runs one CLI command, its output into ``log``, progress lines to the console; signals reach it too."""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd=run.workdir, env={**os.environ, **run.env})

        def forward(signum: int, frame: Any) -> None:
            process.send_signal(signum)  # the run saves a checkpoint at its next step (SaveOnInterrupt) and exits

        # only the main thread may set handlers; a Ray trial runs in a worker thread and Ray stops it by itself
        in_main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
        try:
            assert process.stdout is not None
            for line in process.stdout:
                out.write(line)
                if "[compare " in line:  # a progress bar may share the line
                    print(line[line.index("[compare "):].rstrip(), flush=True)
            return process.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _schedule(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """lr, momentum and decoupled decay of the first optimizer's first parameter group, per step."""
    out = {}
    for tag, series in scalars.items():
        parsed = parse_group_metric_name(tag)
        if parsed and parsed[0] in ("lr", "momentum", "wd") and parsed[1:] == (0, 0):
            out[parsed[0]] = series
    return out


def _history(scalars: dict[str, list[tuple[int, float]]], metric: str) -> dict[str, list[float]]:
    """Per validation: ``metric``, its TTA twin, the epochs done and the wall time then (matched by step; ``None``
    where a validation did not log one)."""
    series = scalars.get(metric, [])
    tta = dict(scalars.get(f"{metric}_tta", []))
    epochs, elapsed = dict(scalars.get(EPOCH, [])), dict(scalars.get(ELAPSED, []))
    return {
        "history": [v for _, v in series],
        "history_tta": [tta.get(s) for s, _ in series] if tta else [],
        "history_epoch": [epochs.get(s, float(i + 1)) for i, (s, _) in enumerate(series)],
        "history_elapsed_s": [elapsed.get(s) for s, _ in series],
    }


def _sessions(run_dir: Path) -> list[dict[str, Any]]:
    """The run's training sessions so far: machine, seconds, end time (``[]`` before the first)."""
    path = run_dir / SESSIONS
    return json.loads(path.read_text()) if path.exists() else []


def _forget_attempt(run: RunSpec, run_dir: Path, timing_file: Path) -> None:
    """An unfinished attempt without its ``last.ckpt`` (deleted, or a run folder copied without its checkpoints)
    cannot be resumed: its curves, wall time and sessions are removed so that the new attempt's are not mixed in."""
    leftovers = [p for p in (run_dir / "tb" / "fit", timing_file, run_dir / SESSIONS) if p.exists()]
    if not leftovers:
        return
    run.say(f"an earlier attempt stopped without a checkpoint ({run_dir / 'checkpoints' / 'last.ckpt'} is "
            "missing): starting again from the first step")
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def execute(run: RunSpec) -> dict[str, Any]:
    """Train (or resume) and evaluate one run, write and return its result; :class:`RunFailed` if it stopped."""
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / RUN_CONFIG
    config_path.write_text(yaml.safe_dump(run.config, sort_keys=False))
    cli = [sys.executable, "-m", "lightning_adamw"]
    last = run_dir / "checkpoints" / "last.ckpt"
    timing_file = run_dir / "wall_time_s"
    if not (run_dir / FINISHED).exists() and not last.exists():
        _forget_attempt(run, run_dir, timing_file)
    spent = float(timing_file.read_text()) if timing_file.exists() else 0.0
    if not (run_dir / FINISHED).exists():
        resume = ["--ckpt_path", str(last)] if last.exists() else []
        run.say("resuming from " + str(last) if resume else "starting")
        start = time.perf_counter()
        code = _subprocess([*cli, "fit", "--config", str(config_path), *run.extra, *resume], run_dir / "log.txt", run)
        session = time.perf_counter() - start
        spent += session
        timing_file.write_text(f"{spent:.1f}")
        # a resumed run's sessions may run on different machines: each one's machine and seconds are kept
        sessions = _sessions(run_dir)
        sessions.append({"machine": describe_machine(), "seconds": round(session, 1),
                         "ended": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        (run_dir / SESSIONS).write_text(json.dumps(sessions, indent=1))
        if not (run_dir / FINISHED).exists():
            raise RunFailed(
                f"Run {run.label} stopped before the end (exit code {code}); see {run_dir / 'log.txt'}. Repeat the "
                "same command to resume it from its last checkpoint."
            )
    test: dict[str, float] = {}
    if run.evaluate is not None:
        eval_path = run_dir / "evaluate.yaml"
        eval_path.write_text(yaml.safe_dump(evaluation_config(run.config, run.evaluate), sort_keys=False))
        code = _subprocess([*cli, "test", "--config", str(eval_path), *run.extra, "--ckpt_path", str(last)],
                           run_dir / "log.txt", run)
        if code != 0:
            raise RunFailed(f"Evaluation of {run.label} failed (exit code {code}); see {run_dir / 'log.txt'}.")
        test = {k: v[-1][1] for k, v in read_scalars(run_dir / "tb" / "evaluate").items() if k.startswith("test/")}
    scalars = read_scalars(run_dir / "tb" / "fit")
    history = _history(scalars, run.metric)
    machines = list(dict.fromkeys(s["machine"] for s in _sessions(run_dir)))
    result = {"variant": run.variant, "seed": run.seed, "metric": run.metric, **history,
              "epochs": len(history["history"]), "wall_time_s": spent, "machines": machines, "test": test,
              "schedule": _schedule(scalars)}
    if history["history"] and not all(math.isfinite(v) for v in history["history"]):
        run.say(f"warning: non-finite {run.metric}")
    (run_dir / RESULT).write_text(json.dumps(result))
    return result


def load_result(run: RunSpec) -> dict[str, Any]:
    return json.loads((Path(run.run_dir) / RESULT).read_text())
