"""Accuracy of a program on examples, with failed LM calls counted rather than raised."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import dspy
from dspy.utils.exceptions import AdapterParseError

from ..errors import TRPromptError
from .parallel import run_parallel
from .scoring import example_id, is_correct, score_prediction

logger = logging.getLogger(__name__)


class EvaluationFailed(TRPromptError, RuntimeError):
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
    #: sum of the scores (:func:`~trprompt_dspy.infra.scoring.metric_score`); equals ``n_correct``
    #: for a right/wrong metric. None: count full marks only.
    total_score: float | None = None

    @property
    def accuracy(self) -> float:
        """Mean score over the examples (for a right/wrong metric: the share answered right)."""
        total = self.n_correct if self.total_score is None else self.total_score
        return total / self.n if self.n else 0.0

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

    def run_one(example: dspy.Example) -> tuple[dspy.Prediction, float]:
        prediction = program(**example.inputs())
        return prediction, score_prediction(metric, example, prediction)

    batch = run_parallel(run_one, examples, num_threads=num_threads, progress=progress, desc="evaluate")
    if batch.n_errors == len(examples) and not any(
        isinstance(e, AdapterParseError) for e in batch.errors.values()
    ):
        first = batch.errors[0]
        raise EvaluationFailed(
            f"all {len(examples)} examples failed; first error: {type(first).__name__}: {first}"
        ) from first

    rows, n_correct, total = [], 0, 0.0
    for i, example in enumerate(examples):
        out = batch.outputs[i]
        prediction, score = out if out is not None else (None, 0.0)
        correct = is_correct(score)
        n_correct += int(correct)
        total += score
        rows.append(
            {
                "id": example_id(example, i),
                "question": example.question,
                "gold": example.get("answer"),
                "prediction": prediction.toDict() if prediction is not None else None,
                "correct": correct,
                "score": score,
                "error": f"{type(batch.errors[i]).__name__}: {batch.errors[i]}" if i in batch.errors else None,
            }
        )
    return EvaluationReport(
        n=len(examples), n_correct=n_correct, n_errors=batch.n_errors,
        error_counts=batch.error_counts(), rows=rows, total_score=round(total, 6),
    )
