"""What each method of an evidence run spent to get its accuracy: the budget table and plot.

Read by ``benchmarks/evidence.py`` from its results (``cell["optimization"]``: LM calls and
tokens per role before the test, and seconds). A reader sees which method buys accuracy cheapest:
one point per cell, accuracy on the first test set against the optimization's LM calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROLES = ("prompter", "target", "critic", "optimizer", "other")


def budget_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per cell that records its optimization: label, calls and tokens per role, seconds,
    accuracy on each test set."""
    rows = []
    for key, cell in results["cells"].items():
        spent = cell.get("optimization")
        if spent is None:
            continue
        rows.append({"cell": key, "method": cell["method"], "seed": cell["seed"], **spent,
                     "budget_target_calls": cell.get("budget_target_calls"),
                     "accuracy": {d: r["accuracy"] for d, r in cell["test"].items()}})
    return rows


def budget_markdown(results: dict[str, Any]) -> list[str]:
    """The budget table, as markdown lines (none when no cell records its optimization)."""
    rows = budget_rows(results)
    if not rows:
        return []
    roles = [r for r in ROLES if any(r in row["by_role"] for row in rows)]
    datasets = list(rows[0]["accuracy"])
    lines = ["", "Optimization budgets (LM calls before the test, per role; tokens = prompt + completion; "
             "GEPA and MIPROv2 get as many target runs as TRPrompt's compile of the same settings makes, "
             "MIPROv2 with demos more, for bootstrapping them):", "",
             "| cell | " + " | ".join(f"{r} calls" for r in roles) + " | LM calls | tokens | seconds | "
             + " | ".join(f"accuracy {d}" for d in datasets) + " |",
             "|---|" + "---:|" * (len(roles) + 3 + len(datasets))]
    for row in rows:
        calls = [str(row["by_role"].get(r, {}).get("calls", 0)) for r in roles]
        lines.append(f"| {row['cell']} | " + " | ".join(calls) + f" | {row['calls']} | {row['tokens']} | "
                     f"{row['seconds']} | " + " | ".join(f"{row['accuracy'].get(d, 0):.1%}" for d in datasets) + " |")
    return lines


def plot_budget(results: dict[str, Any], path: Path, labels: dict[str, str]) -> bool:
    """Accuracy on the first test set against optimization LM calls, one point per cell; False
    (nothing drawn) when no cell records its optimization."""
    rows = budget_rows(results)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = next(iter(rows[0]["accuracy"]))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        ax.scatter([row["calls"] for row in mine], [row["accuracy"].get(dataset, 0) for row in mine],
                   label=labels.get(method, method))
    ax.set(xlabel="LM calls during optimization (all roles)", ylabel=f"test accuracy, {dataset}",
           title=f"evidence-{results['name']}: accuracy against optimization budget", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
