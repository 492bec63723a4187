"""Accuracy of a program on examples, with failed LM calls counted rather than raised."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import dspy
from dspy.utils.exceptions import AdapterParseError

from .parallel import run_parallel

logger = logging.getLogger(__name__)


class EvaluationFailed(RuntimeError):
    """Every example failed for a reason other than unparseable model output (e.g. the LM
    endpoint is down or misconfigured): an accuracy of 0 would hide the real problem."""


@dataclass
class EvaluationReport:
    """The outcome of ``evaluate``: counts and one row per example (in input order)."""

    n: int
    n_correct: int
    n_errors: int
    error_counts: dict[str, int] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy}


def evaluate(
    program: dspy.Module,
    examples: Sequence[dspy.Example],
    metric: Callable[..., Any],
    *,
    num_threads: int = 8,
    progress: bool = True,
) -> EvaluationReport:
    """Run ``program`` on every example in parallel and score it with ``metric``.

    An example whose call raises (above all an ``AdapterParseError`` when the LM's reply does
    not parse) is scored as wrong and counted in ``n_errors``/``error_counts``; the batch goes on.
    Raises ``EvaluationFailed`` when every example failed and none of the failures was a parse
    error, since that means the LM could not be reached rather than that it answered badly.
    """
    if not examples:
        raise ValueError("evaluate() needs at least one example")

    def run_one(example: dspy.Example) -> tuple[dspy.Prediction, bool]:
        prediction = program(**example.inputs())
        return prediction, bool(metric(example, prediction))

    batch = run_parallel(run_one, examples, num_threads=num_threads, progress=progress, desc="evaluate")
    if batch.n_errors == len(examples) and not any(
        isinstance(e, AdapterParseError) for e in batch.errors.values()
    ):
        first = batch.errors[0]
        raise EvaluationFailed(
            f"all {len(examples)} examples failed; first error: {type(first).__name__}: {first}"
        ) from first

    rows, n_correct = [], 0
    for i, example in enumerate(examples):
        out = batch.outputs[i]
        prediction, correct = out if out is not None else (None, False)
        n_correct += int(correct)
        rows.append(
            {
                "id": example.get("id"),
                "question": example.question,
                "gold": example.get("answer"),
                "prediction": prediction.toDict() if prediction is not None else None,
                "correct": correct,
                "error": f"{type(batch.errors[i]).__name__}: {batch.errors[i]}" if i in batch.errors else None,
            }
        )
    return EvaluationReport(
        n=len(examples), n_correct=n_correct, n_errors=batch.n_errors,
        error_counts=batch.error_counts(), rows=rows,
    )
