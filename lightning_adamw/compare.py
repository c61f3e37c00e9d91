"""``python -m lightning_adamw compare``: the study's comparison tables, several optimizers x seeds, resumable.

Each run is the base config with one variant's overrides deep-merged in (variants live in a small YAML beside the
configs), a seed, its own TensorBoard directory and checkpoint folder under ``--out``. Runs go one after another in
subprocesses of ``python -m lightning_adamw fit``; a finished run is skipped when the command is repeated, an
interrupted one resumes from its ``last.ckpt``. After training, each run is evaluated once with the variants file's
``evaluate`` overrides (TTA, cache pointer). The results go to ``results.json``, ``results.md`` (mean and standard
deviation over seeds, as in the study's tables) and two plots: the validation metric per epoch (mean and spread) and
the lr / momentum / weight-decay schedules actually applied.

A variants file::

    applies_to: [cifar10.yaml, quickstart.yaml]          # configs it is the default for
    metric: val/acc                                      # optional: default is the ModelCheckpoint's monitor
    mode: max
    evaluate: {model: {init_args: {tta: true}}}          # overrides for the final evaluation (optional)
    variants:
      adamw: {}                                          # the config as it is
      adam_l2: {model: {init_args: {optimizer: {wd_mode: l2, lr: 1.0e-3, weight_decay: 1.0e-6}}}}
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import Callback

RUN_CONFIG = "config.yaml"
FINISHED = "finished.json"
RESULT = "result.json"


class RunProgress(Callback):
    """Prints the comparison's overall progress at every epoch, and marks a run whose training finished.

    Args:
        label: the run's name in the comparison (``adamw seed 1``).
        index: the run's number, from 1.
        total: how many runs the comparison has.
        finished_file: written when training ends normally (not on an interruption or an error).
    """

    def __init__(self, label: str = "", index: int = 1, total: int = 1, finished_file: str | None = None) -> None:
        super().__init__()
        self.label, self.index, self.total, self.finished_file = label, index, total, finished_file

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            of = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
            print(f"[compare {self.index}/{self.total} | {self.label}] epoch {trainer.current_epoch + 1}/{of}",
                  flush=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.finished_file and trainer.is_global_zero:
            Path(self.finished_file).write_text(json.dumps({"global_step": trainer.global_step}))


def deep_merge(base: Any, override: Any) -> Any:
    """``override`` merged into ``base``: dicts recursively, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
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
    callbacks.append({"class_path": "lightning_adamw.compare.RunProgress",
                      "init_args": {"label": label, "index": index, "total": total,
                                    "finished_file": str(run_dir / FINISHED)}})
    return config


def monitored(config: dict[str, Any]) -> tuple[str, str]:
    """The metric the config's ModelCheckpoint watches, and whether higher is better (``max``)."""
    for callback in _callbacks(config):
        args = callback.get("init_args", {}) if isinstance(callback, dict) else {}
        if _class_name(callback) in CHECKPOINT_CLASSES and args.get("monitor"):
            return args["monitor"], args.get("mode", "min")
    return "val/loss", "min"


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard run as ``tag -> [(step, value)]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not log_dir.exists():
        return {}
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _subprocess(args: list[str], log: Path) -> int:
    """Runs one CLI command, its output into ``log``, progress lines to the console; signals reach it too."""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def forward(signum: int, frame: Any) -> None:
            process.send_signal(signum)  # the run saves a checkpoint at its next step (SaveOnInterrupt) and exits

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
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


def epoch_metrics(scalars: dict[str, list[tuple[int, float]]], metric: str) -> list[float]:
    """The per-epoch values of ``metric`` (one per validation), in order."""
    return [v for _, v in scalars.get(metric, [])]


def summarise(runs: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Per variant: mean and standard deviation over seeds of the final and best metric, test metrics and time."""
    best_of = max if mode == "max" else min
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        group = [r for r in runs if r["variant"] == variant and r["history"]]
        if not group:
            continue
        finals = [r["history"][-1] for r in group]
        bests = [best_of(r["history"]) for r in group]
        row = {"variant": variant, "runs": len(group), "final": _mean_std(finals), "best": _mean_std(bests),
               "epochs": group[0]["epochs"], "wall_time_s": statistics.mean(r["wall_time_s"] for r in group)}
        tests = sorted({k for r in group for k in r["test"]})
        row["test"] = {k: _mean_std([r["test"][k] for r in group if k in r["test"]]) for k in tests}
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(pair: tuple[float, float], metric: str) -> str:
    scale, unit = (100.0, "%") if metric.endswith("acc") or "/acc" in metric else (1.0, "")
    return f"{pair[0] * scale:.2f}{unit} ± {pair[1] * scale:.2f}"


def markdown(rows: list[dict[str, Any]], metric: str, command: str) -> str:
    tests = sorted({k for row in rows for k in row["test"]})
    head = ["variant", "runs", f"final {metric}", f"best {metric}", *tests, "epochs", "wall time / run"]
    lines = [f"Command: `{command}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["variant"], str(row["runs"]), _fmt(row["final"], metric), _fmt(row["best"], metric),
                 *[_fmt(row["test"][k], k) if k in row["test"] else "" for k in tests], str(row["epochs"]),
                 f"{row['wall_time_s']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± standard deviation over seeds."]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], metric: str, out: Path) -> list[Path]:
    """``curves.png`` (metric per epoch, mean and min-max band per variant) and ``schedules.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in runs))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}  # one colour per variant in every panel
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in variants:
        histories = [r["history"] for r in runs if r["variant"] == variant and r["history"]]
        if not histories:
            continue
        length = min(len(h) for h in histories)
        epochs = list(range(1, length + 1))
        columns = [[h[i] for h in histories] for i in range(length)]
        ax.plot(epochs, [statistics.mean(c) for c in columns], label=f"{variant} (n={len(histories)})",
                color=colors[variant])
        ax.fill_between(epochs, [min(c) for c in columns], [max(c) for c in columns], alpha=0.2,
                        color=colors[variant])
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend()
    curves = out / "curves.png"
    fig.tight_layout()
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for variant in variants:
        first = next((r for r in runs if r["variant"] == variant), None)
        for ax, key in zip(axes, ("lr", "momentum", "wd")):
            series = (first or {}).get("schedule", {}).get(key, [])
            if series:
                ax.plot([s for s, _ in series], [v for _, v in series], label=variant, color=colors[variant])
    for ax, key in zip(axes, ("learning rate", "momentum / beta1", "decoupled decay applied (lr_t * wd)")):
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axes[0].set_yscale("log")  # SGD's and Adam's lrs differ by orders of magnitude
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title("schedules actually applied (first seed of each variant, parameter group 0)")
    schedules = out / "schedules.png"
    fig.tight_layout()
    fig.savefig(schedules, dpi=120)
    plt.close(fig)
    return [curves, schedules]


def _schedule(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for key in ("lr", "momentum", "wd"):
        tag = key if key in scalars else f"{key}/pg0"
        if tag in scalars:
            out[key] = scalars[tag]
    return out


def default_variants_file(config: Path) -> Path:
    """The variants file beside ``config`` (``variants/*.yaml`` or ``variants*.yaml``) whose ``applies_to`` names it."""
    for candidate in sorted(config.parent.glob("variants/*.yaml")) + sorted(config.parent.glob("variants*.yaml")):
        spec = yaml.safe_load(candidate.read_text()) or {}
        if config.name in spec.get("applies_to", []):
            return candidate
    raise SystemExit(f"No variants file beside {config} lists it under applies_to; pass --variants_file.")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_adamw compare",
        description="Train a config under several optimizer variants and seeds; tabulate and plot the results. "
        "Arguments after the known ones (e.g. --trainer.max_epochs 5) go to every run.",
    )
    parser.add_argument("--config", required=True, type=Path, help="the base experiment config (YAML)")
    parser.add_argument("--variants", required=True, help="comma-separated variant names from the variants file")
    parser.add_argument("--seeds", type=int, default=3, help="runs per variant (seeds 0..N-1)")
    parser.add_argument("--variants_file", type=Path, help="default: the variants*.yaml beside the config naming it")
    parser.add_argument("--out", type=Path, help="default: runs/compare/<config name>")
    parser.add_argument("--no_evaluate", action="store_true", help="skip the final evaluation with TTA / cache")
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> dict[str, Any]:
    args, extra = parse_args(argv)
    if not args.config.is_file():
        raise SystemExit(f"Config {args.config} does not exist.")
    base = yaml.safe_load(args.config.read_text()) or {}
    variants_file = args.variants_file or default_variants_file(args.config)
    spec = yaml.safe_load(variants_file.read_text()) or {}
    available = spec.get("variants", {})
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"Unknown variant(s) {unknown} in {variants_file}; available: {', '.join(available)}.")
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1.")
    out = args.out or Path("runs") / "compare" / args.config.stem
    out.mkdir(parents=True, exist_ok=True)
    metric, mode = monitored(base)
    metric, mode = spec.get("metric", metric), spec.get("mode", mode)
    plan = [(name, seed) for name in names for seed in range(args.seeds)]
    runs = []
    for index, (name, seed) in enumerate(plan, start=1):
        label = f"{name} seed {seed}"
        run_dir = out / name / f"seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        result_file = run_dir / RESULT
        if result_file.exists():
            print(f"[compare {index}/{len(plan)} | {label}] done earlier: skipped", flush=True)
            runs.append(json.loads(result_file.read_text()))
            continue
        config = run_config(base, available[name] or {}, seed, run_dir, label, index, len(plan))
        config_path = run_dir / RUN_CONFIG
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cli = [sys.executable, "-m", "lightning_adamw"]
        last = run_dir / "checkpoints" / "last.ckpt"
        timing_file = run_dir / "wall_time_s"
        spent = float(timing_file.read_text()) if timing_file.exists() else 0.0
        if not (run_dir / FINISHED).exists():
            resume = ["--ckpt_path", str(last)] if last.exists() else []
            print(f"[compare {index}/{len(plan)} | {label}] "
                  + ("resuming from " + str(last) if resume else "starting"), flush=True)
            start = time.perf_counter()
            code = _subprocess([*cli, "fit", "--config", str(config_path), *extra, *resume], run_dir / "log.txt")
            spent += time.perf_counter() - start
            timing_file.write_text(f"{spent:.1f}")
            if not (run_dir / FINISHED).exists():
                raise SystemExit(
                    f"Run {label} stopped before the end (exit code {code}); see {run_dir / 'log.txt'}. Repeat the "
                    "same command to resume it from its last checkpoint."
                )
        test: dict[str, float] = {}
        if not args.no_evaluate and "evaluate" in spec:
            eval_config = deep_merge(config, spec["evaluate"])
            eval_config["trainer"]["logger"]["init_args"]["version"] = "evaluate"
            eval_config["trainer"]["callbacks"] = [c for c in eval_config["trainer"]["callbacks"]
                                                   if _class_name(c) != "RunProgress"]
            eval_path = run_dir / "evaluate.yaml"
            eval_path.write_text(yaml.safe_dump(eval_config, sort_keys=False))
            code = _subprocess([*cli, "test", "--config", str(eval_path), *extra, "--ckpt_path", str(last)],
                               run_dir / "log.txt")
            if code != 0:
                raise SystemExit(f"Evaluation of {label} failed (exit code {code}); see {run_dir / 'log.txt'}.")
            test = {k: v[-1][1] for k, v in read_scalars(run_dir / "tb" / "evaluate").items() if k.startswith("test/")}
        scalars = read_scalars(run_dir / "tb" / "fit")
        history = epoch_metrics(scalars, metric)
        epochs = len(history)
        result = {"variant": name, "seed": seed, "metric": metric, "history": history, "epochs": epochs,
                  "wall_time_s": spent, "test": test, "schedule": _schedule(scalars)}
        if history and not all(math.isfinite(v) for v in history):
            print(f"[compare {index}/{len(plan)} | {label}] warning: non-finite {metric}", flush=True)
        result_file.write_text(json.dumps(result))
        runs.append(result)

    rows = summarise(runs, metric, mode)
    command = "python -m lightning_adamw compare " + " ".join(argv)
    (out / "results.json").write_text(json.dumps({"metric": metric, "mode": mode, "command": command,
                                                  "summary": rows, "runs": runs}, indent=1))
    table = markdown(rows, metric, command)
    (out / "results.md").write_text(table)
    plots = plot(runs, metric, out)
    print(table)
    print(f"Results: {out / 'results.json'}, {out / 'results.md'}, plots: {', '.join(str(p) for p in plots)}")
    return {"summary": rows, "runs": runs, "out": out}
