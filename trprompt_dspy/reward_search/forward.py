"""The forward pass of the search: ``prompter(question, t*) -> solver -> metric``, in parallel.

:func:`evaluate_rewards` scores several rewards, each on its own questions, in ONE batch of
DSPy's executor, so the k candidates of a step (and their held-out slices) cost about one
evaluation of wall time where the LM server has spare throughput. Each item becomes a row::

    {"id", "question", "reference", "prompt", "answer", "score", "error", "error_type"}

A model reply that does not parse, or any other failure of one item, scores it as wrong
(``error_type`` ``"parse"`` for DSPy's ``AdapterParseError``) and never sinks the batch; a batch
in which every item failed for another reason is marked ``failed`` (the LM is unreachable).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import dspy
from dspy.utils.exceptions import AdapterParseError

from ..infra.parallel import run_parallel
from ..infra.scoring import example_id, score_prediction
from .results import error_text
from .trace import BatchScore


def _row(example: dspy.Example, position: int) -> dict[str, Any]:
    return {
        "id": example_id(example, position),
        "question": example.question,
        "reference": example.get("answer"),
        "prompt": None,
        "answer": None,
        "score": 0.0,
        "error": None,
        "error_type": None,
    }


def run_item(prompter: Any, solver: Any, metric: Callable[..., Any], reward: str, example: dspy.Example,
             position: int) -> dict[str, Any]:
    """prompter -> solver -> metric for one (reward, question); never raises on model output.

    ``position`` (the example's place among its job's examples) names an example without an id.
    """
    row = _row(example, position)
    stage = "prompter"
    try:
        row["prompt"] = prompter(question=example.question, textual_reward=reward).prompt
        stage = "solver"
        solved = solver(question=example.question, prompt=row["prompt"])
        row["answer"] = solved.get("answer") if hasattr(solved, "get") else getattr(solved, "answer", None)
        prediction = dspy.Prediction(
            prompt=row["prompt"], reasoning=solved.get("reasoning") if hasattr(solved, "get") else None,
            answer=row["answer"],
        )
        stage = "metric"
        row["score"] = score_prediction(metric, example, prediction)
    except Exception as error:  # one bad item must not sink the batch; it scores as wrong
        row["error"] = f"{stage}: {error_text(error)}"
        row["error_type"] = "parse" if isinstance(error, AdapterParseError) else type(error).__name__
    return row


def evaluate_rewards(
    prompter: Any,
    solver: Any,
    metric: Callable[..., Any],
    jobs: Sequence[tuple[str, Sequence[dspy.Example]]],
    *,
    num_threads: int,
    desc: str,
    progress: bool,
    straggler_timeout_s: float = 0,
) -> list[tuple[list[dict], BatchScore]]:
    """Evaluate several rewards, each on its own questions, in ONE parallel batch.

    Args:
        prompter, solver, metric: as for :class:`~trprompt_dspy.reward_search.RewardSearch`.
        jobs: ``(reward, examples)`` pairs.
        num_threads: threads of the batch.
        desc: progress-bar label.
        progress: show a progress bar.
        straggler_timeout_s: see ``RewardSearchConfig.straggler_timeout_s``.

    Returns:
        ``(rows, score)`` per job, in order.
    """
    items, owners = [], []
    for j, (reward, examples) in enumerate(jobs):
        for position, example in enumerate(examples):
            items.append((reward, example, position))
            owners.append(j)
    batch = run_parallel(
        lambda item: run_item(prompter, solver, metric, *item), items, num_threads=num_threads, desc=desc,
        progress=progress, straggler_timeout=straggler_timeout_s,
    )
    rows_per_job: list[list[dict]] = [[] for _ in jobs]
    for i, out in enumerate(batch.outputs):
        if out is None:  # run_item catches everything but BaseException-level surprises
            _, example, position = items[i]
            out = _row(example, position)
            out["error"], out["error_type"] = error_text(batch.errors[i]), type(batch.errors[i]).__name__
        rows_per_job[owners[i]].append(out)
    return [(rows, BatchScore.of_rows(rows)) for rows in rows_per_job]


__all__ = ["evaluate_rewards", "run_item"]
