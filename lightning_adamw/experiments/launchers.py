"""Where the runs of a comparison execute: one after another here (``local``), or as Ray Tune trials (``ray``).

Both run :func:`~lightning_adamw.experiments.runs.execute` on each pending run and leave the same files behind; a
launcher returns the messages of the runs that failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_adamw.experiments.runs import RunFailed, RunSpec, execute


def run_local(runs: list[RunSpec]) -> list[str]:
    """One run after another in this process's subprocesses; stops at the first that fails (Ctrl-C stops it)."""
    for run in runs:
        try:
            execute(run)
        except RunFailed as err:
            return [str(err)]
    return []


def _trial(config: dict[str, Any], runs: list[RunSpec]) -> None:
    from ray import tune

    result = execute(runs[config["run"]])
    tune.report({"epochs": result["epochs"]})


def run_ray(runs: list[RunSpec], out: Path, cpus_per_run: float, gpus_per_run: float,
            address: str | None) -> list[str]:
    """Each run a Ray Tune trial (a grid over the runs) with its resources; as many at once as the cluster holds.

    Ray is started here unless the caller started it (``ray.init``); ``address`` joins a running cluster
    (``"auto"``: the one ``ray start`` made on this node). The run folders must be on storage every node sees.
    Tune's own records go to ``<out>/ray``; Tune does not retry a failed trial: repeating the command resumes it.
    """
    try:
        import ray
        from ray import tune
    except ImportError:
        raise SystemExit("--launcher ray needs Ray Tune: pip install 'lightning-adamw[sweep]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    trainable = tune.with_resources(tune.with_parameters(_trial, runs=runs), {"cpu": cpus_per_run,
                                                                              "gpu": gpus_per_run})
    tuner = tune.Tuner(
        trainable,
        param_space={"run": tune.grid_search(list(range(len(runs))))},
        tune_config=tune.TuneConfig(trial_dirname_creator=lambda trial: f"run{trial.config['run']}"),
        run_config=tune.RunConfig(name="compare", storage_path=str(out.resolve() / "ray"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    grid = tuner.fit()
    failed = []
    for result in grid:
        if result.error is not None:
            run = runs[result.config["run"]]
            cause = result.error.cause if hasattr(result.error, "cause") else result.error
            failed.append(str(cause) if isinstance(cause, RunFailed) else f"Run {run.label} failed in Ray: {cause}")
    return failed
