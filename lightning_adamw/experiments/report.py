"""The comparison's ``results.md`` table and its two plots."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lightning_adamw.experiments.results import Spread


def _is_accuracy(metric: str) -> bool:
    return metric.endswith("acc") or "/acc" in metric


def fmt(pair: Spread | None, metric: str, signed: bool = False) -> str:
    """``56.38% ± 0.61``; a single seed shows its value alone (no spread to show)."""
    if pair is None:
        return "—"
    scale, unit = (100.0, "%") if _is_accuracy(metric) else (1.0, "")
    mean = f"{pair[0] * scale:+.2f}" if signed else f"{pair[0] * scale:.2f}"
    return f"{mean}{unit}" + ("" if pair[1] is None else f" ± {pair[1] * scale:.2f}")


def _gap(gap: dict[str, Any] | None, metric: str) -> str:
    if gap is None:
        return ""
    scale, unit = (100.0, " pts") if _is_accuracy(metric) else (1.0, "")
    text = f"{gap['diff'] * scale:+.2f}{unit}"
    if gap["ci"] is None:
        return text + " (one seed: no interval)"
    low, high = (x * scale for x in gap["ci"])
    text += f" [{low:+.2f}, {high:+.2f}]"
    return text + (f", p = {gap['p']:.2g}" if gap["p"] is not None else ", no seed spread")


def _target(stats: dict[str, Any] | None) -> tuple[str, str]:
    if stats is None:
        return "", ""
    count = f" ({stats['reached']}/{stats['of']})"
    if not stats["reached"]:
        return f"never{count}", f"never{count}"
    epochs = fmt(stats["epoch"], "epochs")
    seconds = "—" if stats["time_s"] is None else fmt(stats["time_s"], "s") + " s"
    return epochs + count, seconds + count


def machines_note(runs: list[dict[str, Any]]) -> list[str]:
    """Where the wall times were measured: one line for one machine; with several, which runs ran on which."""
    where: dict[str, list[str]] = {}
    for run in runs:
        label = f"{run['variant']} seed {run['seed']}"
        for machine in run.get("machines") or ["not recorded"]:
            where.setdefault(machine, []).append(label)
    if len(where) == 1:
        return [f"Wall times measured on: {next(iter(where))}."]
    lines = [f"(!) The runs' wall times come from {len(where)} machines; compare times only between runs of one "
             "machine (epochs do not depend on it). A run resumed on another machine is listed under each:"]
    return lines + [f"- {machine}: {', '.join(labels)}" for machine, labels in where.items()]


def markdown(rows: list[dict[str, Any]], metric: str, command: str, baseline: str | None = None,
             target: float | None = None, results: list[dict[str, Any]] | None = None) -> str:
    """The table of ``rows``; with the runs' ``results``, a note on which machine their wall times come from."""
    tests = sorted({k for row in rows for k in row.get("test", {})})
    tta = any("to_target_tta" in row for row in rows)
    final_tta = any("final_tta" in row for row in rows)
    head = ["variant", "runs", f"final {metric}", *([f"final {metric}_tta"] if final_tta else []), f"best {metric}",
            *tests]
    if baseline:
        head.append(f"final vs {baseline} (95% CI)")
    if target is not None:
        head += [f"epochs to {target:g}", f"time to {target:g}"]
        head += [f"epochs to {target:g} (TTA)", f"time to {target:g} (TTA)"] if tta else []
    head += ["epochs", "wall time / run"]
    lines = [f"Command: `{command}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        runs = str(row["runs"]) if row["evaluated"] == row["runs"] else f"{row['evaluated']} of {row['runs']} (!)"
        if not row["evaluated"]:
            cells = [row["variant"], runs, "no evaluation (!)", *["—"] * (1 + final_tta + len(tests))]
            cells += [""] * (len(head) - len(cells) - 2)
        else:
            cells = [row["variant"], runs, fmt(row["final"], metric),
                     *([fmt(row.get("final_tta"), metric)] if final_tta else []), fmt(row["best"], metric),
                     *[fmt(row["test"].get(k), k) for k in tests]]
            if baseline:
                cells.append("baseline" if row["variant"] == baseline else _gap(row.get("vs_baseline"), metric))
            if target is not None:
                cells += [*_target(row.get("to_target"))]
                cells += [*_target(row.get("to_target_tta"))] if tta else []
        cells += [f"{row['epochs']:g}", f"{row['wall_time_s']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["Mean ± standard deviation over the seeds that validated; a variant with one seed shows its value alone."]
    if baseline:
        notes.append(f"`final vs {baseline}`: difference of the mean final {metric} from the baseline's, with the 95% "
                     "confidence interval and two-sided p-value of Welch's t-test over seeds (needs 2 seeds a side).")
    if target is not None:
        notes.append(f"Epochs and wall time (from the start of training, resumed sessions summed) of the first "
                     f"validation at which {metric} reached {target:g}, over the runs that did (reached / runs).")
    if results:
        notes += ["", *machines_note(results)]
    problems = [p for row in rows for p in row["problems"]]
    if problems:
        notes += ["", "(!) Runs left out:", *[f"- {p}" for p in problems]]
    return "\n".join(lines + [""] + notes) + "\n"


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
                color=colors[variant], marker="o" if length == 1 else None)
        ax.fill_between(epochs, [min(c) for c in columns], [max(c) for c in columns], alpha=0.2,
                        color=colors[variant])
    missing = [v for v in variants if not any(r["history"] for r in runs if r["variant"] == v)]
    if missing:
        ax.text(0.5, 0.5, f"no {metric} logged by: {', '.join(missing)}\n(see results.md)", transform=ax.transAxes,
                ha="center", va="center", color="C3")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    if ax.lines:
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
    if axes[0].lines:
        axes[0].set_yscale("log")  # SGD's and Adam's lrs differ by orders of magnitude
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title("schedules actually applied (first seed of each variant, parameter group 0)")
    schedules = out / "schedules.png"
    fig.tight_layout()
    fig.savefig(schedules, dpi=120)
    plt.close(fig)
    return [curves, schedules]
