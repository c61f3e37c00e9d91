"""The comparison's numbers: per variant mean and spread over seeds, the gap to a baseline, time to a target."""

from __future__ import annotations

import math
import statistics
from typing import Any

Spread = tuple[float, float | None]  # mean, standard deviation (None with a single value)


def mean_std(values: list[float]) -> Spread:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def welch(a: list[float], b: list[float]) -> dict[str, Any]:
    """``mean(a) - mean(b)`` with Welch's t-test: its 95% confidence interval and two-sided p-value.

    Both are ``None`` with fewer than two seeds on a side (no estimate of the seed noise); with no spread on either
    side at all (deterministic, identical seeds) the interval is the difference itself and there is no p-value.
    """
    diff = statistics.mean(a) - statistics.mean(b)
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "ci": None, "p": None}
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        return {"diff": diff, "ci": [diff, diff], "p": None}
    from scipy import stats

    test = stats.ttest_ind(a, b, equal_var=False)
    interval = test.confidence_interval(0.95)
    return {"diff": diff, "ci": [float(interval.low), float(interval.high)], "p": float(test.pvalue)}


def reached(run: dict[str, Any], target: float, mode: str, tta: bool = False) -> dict[str, float | None] | None:
    """The first validation at which a run's metric (or its TTA twin) reached ``target``: epochs done, seconds."""
    values = run.get("history_tta" if tta else "history") or []
    epochs, elapsed = run.get("history_epoch") or [], run.get("history_elapsed_s") or []
    for i, value in enumerate(values):
        if value is not None and (value >= target if mode == "max" else value <= target):
            return {"epoch": epochs[i] if i < len(epochs) else float(i + 1),
                    "time_s": elapsed[i] if i < len(elapsed) else None}
    return None


def _logged(values: list[float | None] | None) -> list[float]:
    return [v for v in values or [] if v is not None]


def _to_target(group: list[dict[str, Any]], target: float, mode: str, tta: bool) -> dict[str, Any]:
    hits = [hit for hit in (reached(r, target, mode, tta) for r in group) if hit is not None]
    times = [h["time_s"] for h in hits if h["time_s"] is not None]
    return {"reached": len(hits), "of": len(group),
            "epoch": mean_std([h["epoch"] for h in hits]) if hits else None,
            "time_s": mean_std(times) if times else None}


def run_problems(run: dict[str, Any], metric: str) -> list[str]:
    """Why a run's numbers cannot be trusted, if they cannot: it never validated, or its metric is not finite."""
    label = f"{run['variant']} seed {run['seed']}"
    if not run["history"]:
        return [f"{label}: no {metric} logged (training stopped before its first validation, or validation is "
                "off: check limit_val_batches and check_val_every_n_epoch); left out of the table and the plot"]
    if not all(math.isfinite(v) for v in run["history"]):
        return [f"{label}: non-finite {metric} (the run diverged)"]
    return []


def summarise(runs: list[dict[str, Any]], metric: str, mode: str, baseline: str | None = None,
              target: float | None = None) -> list[dict[str, Any]]:
    """Per variant: final and best metric, test metrics and time over the seeds that validated; the gap of the final
    metric to ``baseline``'s; with ``target``, epochs and time until the metric (and its TTA twin) first reached it."""
    best_of = max if mode == "max" else min
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    evaluated = {v: [r for r in runs if r["variant"] == v and r["history"]] for v in variants}
    rows = []
    for variant in variants:
        everyone = [r for r in runs if r["variant"] == variant]
        group = evaluated[variant]
        row: dict[str, Any] = {"variant": variant, "runs": len(everyone), "evaluated": len(group),
                               "problems": [p for r in everyone for p in run_problems(r, metric)],
                               "epochs": max(r["epochs"] for r in everyone),
                               "wall_time_s": statistics.mean(r["wall_time_s"] for r in everyone)}
        if group:
            row["final"] = mean_std([r["history"][-1] for r in group])
            row["best"] = mean_std([best_of(r["history"]) for r in group])
            finals_tta = [tta[-1] for tta in (_logged(r.get("history_tta")) for r in group) if tta]
            if finals_tta:  # the TTA twin's last value (validations may skip TTA: tta_last_epochs)
                row["final_tta"] = mean_std(finals_tta)
            tests = sorted({k for r in group for k in r["test"]})
            row["test"] = {k: mean_std([r["test"][k] for r in group if k in r["test"]]) for k in tests}
            if baseline and variant != baseline and evaluated.get(baseline):
                row["vs_baseline"] = welch([r["history"][-1] for r in group],
                                           [r["history"][-1] for r in evaluated[baseline]])
            if target is not None:
                row["to_target"] = _to_target(group, target, mode, tta=False)
                if any(r.get("history_tta") for r in group):
                    row["to_target_tta"] = _to_target(group, target, mode, tta=True)
        rows.append(row)
    return rows
