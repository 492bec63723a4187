"""A compile's report: ``report.json`` (rounds, timings, usage) and its plot ``report.png``.

Both are rewritten after every round, so an interrupted compile leaves a report of the rounds
it completed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..infra.runs import RunFolder, atomic_write_json
from .config import STAGES

logger = logging.getLogger(__name__)


def write_report(folder: RunFolder, report: dict[str, Any]) -> None:
    """Write ``report.json`` and ``report.png`` into the run folder (a failed plot only warns)."""
    atomic_write_json(folder.file("report.json"), report)
    try:
        _plot(report, folder.file("report.png"))
    except Exception as exc:  # a plot must never cost the run
        logger.warning("could not draw the report plot: %s", exc)


def _plot(report: dict[str, Any], path: Path) -> None:
    # matplotlib is imported here, not at the top: only the plot needs it, and it takes ~1 s to load
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    ks = [r["round"] for r in rounds]
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    val_ks = ([0] if "initial_validation" in report else []) + ks
    val = ([report["initial_validation"]["accuracy"]] if "initial_validation" in report else []) + [
        r.get("validation", {}).get("accuracy") for r in rounds
    ]
    if any(v is not None for v in val):
        ax_acc.plot(val_ks, [v if v is not None else float("nan") for v in val], marker="o", label="validation")
    ax_acc.plot(ks, [r["rollout"]["accuracy"] for r in rounds], marker="s", linestyle="--", label="rollout (training)")
    ax_acc.set(xlabel="round (0: untrained)", ylabel="accuracy", title="Accuracy per round", ylim=(0, 1), xticks=val_ks)
    ax_acc.legend()
    bottom = [0.0] * len(ks)
    for stage in STAGES:
        secs = [float(r.get(stage, {}).get("seconds", 0.0) or 0.0) for r in rounds]
        ax_time.bar(ks, secs, bottom=bottom, label=stage)
        bottom = [b + s for b, s in zip(bottom, secs)]
    ax_time.set(xlabel="round", ylabel="seconds", title="Wall time per stage", xticks=ks)
    ax_time.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
