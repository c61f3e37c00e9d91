"""``python -m lightning_adamw compare``: the study's comparison tables, several optimizers x seeds, resumable.

Each run is the base config with one variant's overrides deep-merged in (variants live in a small YAML beside the
configs), a seed, its own TensorBoard directory and checkpoint folder under ``--out``
(:mod:`~lightning_adamw.experiments.runs`). The runs execute one after another in subprocesses of
``python -m lightning_adamw fit`` (``--launcher local``) or as Ray Tune trials, in parallel on one machine or a
cluster (``--launcher ray``); a finished run is skipped when the command is repeated, an interrupted one resumes from
its ``last.ckpt``. After training, each run is evaluated once with the variants file's ``evaluate`` overrides (TTA,
cache pointer). The results go to ``results.json``, ``results.md`` (mean and standard deviation over seeds, as in the
study's tables; with ``--baseline`` each variant's gap to it with a confidence interval; with ``--target`` epochs and
time to reach it) and two plots: the validation metric per epoch (mean and spread) and the lr / momentum /
weight-decay schedules actually applied.

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
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_adamw.experiments.launchers import run_local, run_ray
from lightning_adamw.experiments.report import markdown, plot
from lightning_adamw.experiments.results import summarise
from lightning_adamw.experiments.runs import RunSpec, default_variants_file, load_result, monitored, run_config


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_adamw compare",
        description="Train a config under several optimizer variants and seeds; tabulate and plot the results. "
        "Arguments after the known ones (e.g. --trainer.max_epochs 5) go to every run.",
    )
    parser.add_argument("--config", required=True, type=Path, help="the base experiment config (YAML)")
    parser.add_argument("--variants", required=True,
                        help="comma-separated variant names from the variants file, or 'all'")
    parser.add_argument("--seeds", type=int, default=3, help="runs per variant (seeds 0..N-1)")
    parser.add_argument("--variants_file", type=Path, help="default: the variants*.yaml beside the config naming it")
    parser.add_argument("--out", type=Path, help="default: runs/compare/<config name>")
    parser.add_argument("--no_evaluate", action="store_true", help="skip the final evaluation with TTA / cache")
    parser.add_argument("--baseline", help="a variant: each other variant's gap to it, with Welch's 95%% CI")
    parser.add_argument("--target", type=float, help="a value of the metric: epochs and time until each run "
                        "first reached it (and with TTA where validation logs it)")
    parser.add_argument("--only", help="comma-separated variant:seed runs to train now (one per job-array task); "
                        "no tables: run the command without --only once all are done")
    parser.add_argument("--launcher", choices=("local", "ray"), default="local",
                        help="local: one run after another here; ray: Ray Tune trials, in parallel")
    parser.add_argument("--cpus_per_run", type=float, default=1.0, help="--launcher ray: CPUs each trial holds")
    parser.add_argument("--gpus_per_run", type=float, default=0.0, help="--launcher ray: GPUs each trial holds")
    parser.add_argument("--ray_address", help="--launcher ray: the cluster to join ('auto': the local `ray start`); "
                        "default: a Ray started for this command")
    return parser.parse_known_args(argv)


@dataclass
class Comparison:
    """A checked command line: the base config, the variants file, what to run and how to read the results."""

    base: dict[str, Any]
    spec: dict[str, Any]
    names: list[str]
    metric: str
    mode: str
    out: Path


def load(args: argparse.Namespace) -> Comparison:
    """Read the config and the variants file; refuse unknown variants, seeds, baseline or --only entries."""
    if not args.config.is_file():
        raise SystemExit(f"Config {args.config} does not exist.")
    base = yaml.safe_load(args.config.read_text()) or {}
    variants_file = args.variants_file or default_variants_file(args.config)
    spec = yaml.safe_load(variants_file.read_text()) or {}
    available = spec.get("variants", {})
    names = (list(available) if args.variants.strip() == "all"
             else [n.strip() for n in args.variants.split(",") if n.strip()])
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"Unknown variant(s) {unknown} in {variants_file}; available: {', '.join(available)}.")
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1.")
    if args.baseline is not None and args.baseline not in names:
        raise SystemExit(f"--baseline {args.baseline} is not among --variants {','.join(names)}: add it there.")
    metric, mode = monitored(base)
    out = args.out or Path("runs") / "compare" / args.config.stem
    return Comparison(base, spec, names, spec.get("metric", metric), spec.get("mode", mode), out)


def plan(comparison: Comparison, args: argparse.Namespace, extra: list[str]) -> list[RunSpec]:
    """Every variant x seed as a :class:`RunSpec`, in the order the tables list them."""
    pairs = [(name, seed) for name in comparison.names for seed in range(args.seeds)]
    evaluate = comparison.spec["evaluate"] if not args.no_evaluate and "evaluate" in comparison.spec else None
    out = comparison.out.resolve()
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}
    runs = []
    for index, (name, seed) in enumerate(pairs, start=1):
        run_dir = out / name / f"seed{seed}"
        config = run_config(comparison.base, comparison.spec["variants"][name] or {}, seed, run_dir,
                            f"{name} seed {seed}", index, len(pairs))
        runs.append(RunSpec(name, seed, index, len(pairs), str(run_dir), config, evaluate, extra, comparison.metric,
                            str(Path.cwd()), env))
    return runs


def select(runs: list[RunSpec], only: str) -> list[RunSpec]:
    """The runs named ``variant:seed`` in ``only``; refuses a name that is not in the plan."""
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = {f"{r.variant}:{r.seed}": r for r in runs}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"--only {','.join(unknown)}: not a variant:seed of this comparison "
                         f"(e.g. {next(iter(known))}; seeds run 0..--seeds-1).")
    return [known[w] for w in wanted]


def report(comparison: Comparison, runs: list[RunSpec], args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """``results.json``, ``results.md`` and the plots from the runs' result files."""
    results = [load_result(r) for r in runs]
    metric, out = comparison.metric, comparison.out
    rows = summarise(results, metric, comparison.mode, args.baseline, args.target)
    command = "python -m lightning_adamw compare " + " ".join(argv)
    (out / "results.json").write_text(json.dumps({"metric": metric, "mode": comparison.mode, "command": command,
                                                  "baseline": args.baseline, "target": args.target,
                                                  "summary": rows, "runs": results}, indent=1))
    table = markdown(rows, metric, command, args.baseline, args.target, results)
    (out / "results.md").write_text(table)
    plots = plot(results, metric, out)
    print(table)
    print(f"Results: {out / 'results.json'}, {out / 'results.md'}, plots: {', '.join(str(p) for p in plots)}")
    return {"summary": rows, "runs": results, "out": out}


def main(argv: list[str]) -> dict[str, Any]:
    args, extra = parse_args(argv)
    comparison = load(args)
    comparison.out.mkdir(parents=True, exist_ok=True)
    runs = plan(comparison, args, extra)
    chosen = select(runs, args.only) if args.only else runs
    for run in chosen:
        if run.done:
            run.say("done earlier: skipped")
    pending = [r for r in chosen if not r.done]
    if args.launcher == "ray" and pending:
        failed = run_ray(pending, comparison.out, args.cpus_per_run, args.gpus_per_run, args.ray_address)
    else:
        failed = run_local(pending)
    if failed:
        raise SystemExit("\n".join(failed))
    if args.only:
        print(f"Done: {args.only}. Once every run is, the same command without --only writes the tables.")
        return {"summary": [], "runs": [load_result(r) for r in chosen], "out": comparison.out}
    return report(comparison, runs, args, argv)
