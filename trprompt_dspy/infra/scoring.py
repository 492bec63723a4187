"""One way to turn what a metric returns into a score, and one way to name an example.

A DSPy metric may return a bool, a number, or a ``dspy.Prediction`` with a ``score`` (the
feedback metrics of GEPA). Every stage (rollout, t* search, evaluation) scores through
:func:`metric_score`, so the same prediction gets the same score everywhere: a float in [0, 1],
where NaN, a negative number or something that is not a number counts as wrong, and a number
above 1 as full marks. A question counts as answered correctly when its score is 1
(:func:`is_correct`).
"""

from __future__ import annotations

import math
from typing import Any, Callable


def metric_score(value: Any) -> float:
    """The score in [0, 1] of a metric's return value (see the module doc)."""
    if hasattr(value, "score") and not isinstance(value, (bool, int, float)):
        value = value.score
    if isinstance(value, bool):
        return float(value)
    try:
        score = float(value)
    except (TypeError, ValueError):
        return 0.0
    if math.isnan(score):
        return 0.0
    return min(max(score, 0.0), 1.0)


def is_correct(score: float) -> bool:
    """Whether a score (from :func:`metric_score`) is full marks."""
    return score >= 1.0


def score_prediction(metric: Callable[..., Any], example: Any, prediction: Any) -> float:
    """``metric(example, prediction)`` as a score in [0, 1]."""
    return metric_score(metric(example, prediction))


def example_id(example: Any, fallback: int | str) -> str:
    """The id of an example as a string: its ``id`` field, or ``fallback`` (its position) when the
    field is missing, None or empty. Ids are strings everywhere (JSON keys, records, reports)."""
    value = example.get("id") if hasattr(example, "get") else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return str(fallback)
    return str(value)
