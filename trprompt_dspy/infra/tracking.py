"""Experiment tracking of a compile in MLflow (``TRPromptConfig.track="mlflow"``, ``--track mlflow``).

One MLflow run per ``compile`` call: its settings as parameters; per round (the round number is
the metric's step) the validation and rollout accuracy, the answer-in-prompt rate, the SFT loss
(its curve as the steps of ``sft_loss``), LM calls, tokens, dollars and seconds per stage; at
the end t* (text), ``report.json``, ``report.png`` and the compiled program (artifacts), and
which cap stopped the compile if one did. The store is local, no server needed: by default
``sqlite:///<log_dir>/mlflow.db`` with artifacts beside it, or ``MLFLOW_TRACKING_URI``, or any
tracking URI given. MLflow is an optional extra (``pip install 'trprompt-dspy[track]'``); asked
for without it, the compile stops before any LM call with one line saying so.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import TRPromptError

TRACKERS = ("mlflow",)
EXPERIMENT = "trprompt"


class TrackingError(TRPromptError, RuntimeError):
    """Tracking was asked for and cannot be done (the package is missing, the store refuses)."""


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        # MLflow caps a parameter at 6000 characters; the reward text is logged whole as an artifact
        out[prefix] = str(value)[:500]
    return out


class MLflowTracker:
    """Logs one compile to MLflow (see the module doc).

    Args:
        log_dir: the compile's run folder (the default store lives in it).
        uri: a tracking URI (``sqlite:///path.db``, ``http://...``); None: ``MLFLOW_TRACKING_URI``
            if set, else ``sqlite:///<log_dir>/mlflow.db``.
        experiment: the MLflow experiment (made if missing).
    """

    def __init__(self, log_dir: Path, uri: str | None = None, experiment: str = EXPERIMENT):
        try:
            import mlflow
        except ModuleNotFoundError:
            raise TrackingError("track='mlflow' needs MLflow: pip install 'trprompt-dspy[track]' "
                                "(or pip install mlflow)") from None
        self.mlflow = mlflow
        self.log_dir = Path(log_dir)
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(self.log_dir / 'mlflow.db').resolve()}"
        self.client = mlflow.tracking.MlflowClient(self.uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                artifacts = None
                if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in the cwd
                    artifacts = (Path(self.uri[len("sqlite:///"):]).parent / "mlflow-artifacts").resolve().as_uri()
                experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
            else:
                experiment_id = found.experiment_id
            self.run_id = self.client.create_run(experiment_id, run_name=self.log_dir.name).info.run_id
        except Exception as exc:
            raise TrackingError(f"MLflow store {self.uri}: {type(exc).__name__}: {str(exc)[:300]}") from None

    def log_config(self, described: dict[str, Any]) -> None:
        """The compile's settings (``config.json``) as parameters."""
        params = _flat("", {k: v for k, v in described.items() if k != "role_servers"}, {})
        params.pop("config.initial_reward", None)  # long text: an artifact instead
        for name, value in params.items():
            self.client.log_param(self.run_id, name, value)
        self.client.log_text(self.run_id, described.get("config", {}).get("initial_reward", ""), "initial_reward.txt")

    def log_round(self, row: dict[str, Any]) -> None:
        """One finished round of the report (``report["rounds"][k-1]``)."""
        k = row["round"]
        metrics: dict[str, float] = {}
        if "validation" in row:
            metrics["validation_accuracy"] = row["validation"]["accuracy"]
        rollout = row.get("rollout", {})
        for key in ("accuracy", "answer_in_prompt_rate"):
            if rollout.get(key) is not None:
                metrics[f"rollout_{key}"] = rollout[key]
        finetune = row.get("finetune", {})
        if finetune.get("final_loss") is not None:
            metrics["sft_final_loss"] = finetune["final_loss"]
        search = row.get("reward_search", {})
        if search.get("best_accuracy") is not None:
            metrics["search_best_accuracy"] = search["best_accuracy"]
        calls = tokens = 0
        cost = None
        for stage, roles in row.get("usage", {}).items():
            stage_calls = sum(m["calls"] for models in roles.values() for m in models.values())
            metrics[f"{stage}_lm_calls"] = stage_calls
            calls += stage_calls
            tokens += sum(m["prompt_tokens"] + m["completion_tokens"] for models in roles.values() for m in models.values())
            for models in roles.values():
                for m in models.values():
                    if m.get("cost_usd") is not None:
                        cost = (cost or 0.0) + m["cost_usd"]
            if isinstance(row.get(stage), dict) and row[stage].get("seconds") is not None:
                metrics[f"{stage}_seconds"] = row[stage]["seconds"]
        metrics.update(lm_calls=calls, tokens=tokens)
        if cost is not None:
            metrics["cost_usd"] = cost
        for name, value in metrics.items():
            self.client.log_metric(self.run_id, name, float(value), step=k)
        for i, loss in enumerate(finetune.get("loss_curve") or []):
            self.client.log_metric(self.run_id, f"sft_loss_round_{k}", float(loss), step=i)
        self.client.log_text(self.run_id, search.get("best_reward", ""), f"round_{k}/t_star.txt")

    def finish(self, report: dict[str, Any], program: Any = None) -> None:
        """t*, the report (and plot), the compiled program; the run ends FINISHED."""
        self.client.log_text(self.run_id, report.get("final_reward", ""), "t_star.txt")
        if report.get("selected_round") is not None:
            self.client.log_metric(self.run_id, "selected_round", float(report["selected_round"]))
        if report.get("stopped_by"):
            self.client.set_tag(self.run_id, "stopped_by", report["stopped_by"]["message"])
        self.client.log_text(self.run_id, json.dumps(report, indent=1, default=str), "report.json")
        plot = self.log_dir / "report.png"
        if plot.is_file():
            self.client.log_artifact(self.run_id, str(plot))
        if program is not None:
            with tempfile.TemporaryDirectory() as tmp:
                program.save(Path(tmp) / "program")
                self.client.log_artifacts(self.run_id, str(Path(tmp) / "program"), "program")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        """The compile raised: the run ends FAILED (what was logged stays)."""
        try:
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception:  # never mask the compile's own error
            pass


def make_tracker(track: str | None, log_dir: Path, uri: str | None = None) -> MLflowTracker | None:
    """The tracker ``TRPromptConfig.track`` asks for, or None."""
    if track is None:
        return None
    if track == "mlflow":
        return MLflowTracker(log_dir, uri)
    raise ValueError(f"track must be None or one of {', '.join(TRACKERS)}, got {track!r}")
