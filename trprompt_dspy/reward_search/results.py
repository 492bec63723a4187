"""The text of a minibatch's results, which TextGrad's loss and gradient read.

The forward pass leaves one row per question (``forward.run_item``); :func:`results_text` turns
the rows into the textual evaluation: the accuracy, the failed questions (with the prompt the
solver got, its answer and the reference) and then the correct ones, each field on one line and
the whole within a character budget. The layout strings are in
``trprompt_dspy.prompts.reward_search``.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..infra.scoring import is_correct
from ..prompts import reward_search as prompts
from .trace import BatchScore


def short_text(text: Any, limit: int) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``limit`` characters."""
    text = "" if text is None else str(text)
    text = " ".join(text.split())  # one line per field keeps the results text compact
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def error_text(error: BaseException, limit: int = 300) -> str:
    """``"TypeName: message"`` of an exception, on one line and at most ``limit`` characters."""
    return short_text(f"{type(error).__name__}: {error}", limit)


def format_total(total: float) -> str:
    """A summed score: ``3`` for whole numbers, else two decimals."""
    return str(int(total)) if float(total).is_integer() else f"{total:.2f}"


def format_accuracy(score: BatchScore | None) -> str:
    """``"3/8 (37.5%)"`` for log lines (``"n/a"`` for no score)."""
    return "n/a" if score is None else f"{format_total(score.total)}/{score.n} ({score.accuracy:.1%})"


def _item_text(template: str, index: int, row: dict, limit: int) -> str:
    error = prompts.ITEM_ERROR.format(error=short_text(row.get("error"), limit)) if row.get("error") else None
    return template.format(
        index=index,
        question=short_text(row["question"], limit),
        prompt=short_text(row["prompt"], limit) if row.get("prompt") is not None else error or "",
        # A failed prompter call already showed the error in place of the prompt.
        answer=short_text(row["answer"], limit) if row.get("answer") is not None
        else (error if row.get("prompt") is not None else prompts.NOT_REACHED) or "",
        reference=short_text(row.get("reference"), limit),
    )


def results_text(rows: Sequence[dict], score: BatchScore, *, max_chars: int, max_field_chars: int) -> str:
    """The textual evaluation of a minibatch: accuracy, failed questions, correct ones.

    Failed questions come first; items that do not fit ``max_chars`` are counted, not shown.
    Each question, prompt and answer is cut to ``max_field_chars``.
    """
    header = prompts.RESULTS_HEADER.format(n_correct=format_total(score.total), n=score.n, accuracy=score.accuracy)
    failed = [r for r in rows if not is_correct(r["score"])]
    succeeded = [r for r in rows if is_correct(r["score"])]
    parts = [header]
    budget = max_chars - len(header)
    for title, group, template in (
        (prompts.FAILED_HEADER, failed, prompts.FAILED_ITEM),
        (prompts.SUCCEEDED_HEADER, succeeded, prompts.SUCCEEDED_ITEM),
    ):
        parts.append(title)
        budget -= len(title)
        if not group:
            parts.append(prompts.NO_ITEMS)
            continue
        shown = 0
        for index, row in enumerate(group, 1):
            text = _item_text(template, index, row, max_field_chars)
            if len(text) > budget:
                break
            parts.append(text)
            budget -= len(text) + 1
            shown += 1
        if shown < len(group):
            parts.append(prompts.ITEMS_OMITTED.format(count=len(group) - shown))
    return "\n".join(parts)


__all__ = ["error_text", "format_accuracy", "format_total", "results_text", "short_text"]
