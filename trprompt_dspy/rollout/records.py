"""Rollout records: what one prompt earned, and their one on-disk form (JSON lines).

The rollout stage appends these to ``round_k/records.jsonl``; the fine-tuning stage reads them
back and trains the prompter on (question, critique) -> prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import TRPromptError
from ..infra.runs import atomic_write_text, iter_jsonl


class RecordError(TRPromptError, ValueError):
    """A rollout record (or a records file) is missing or malformed."""


@dataclasses.dataclass
class RolloutRecord:
    """One rollout of the prompter: the prompt it wrote for a question and what that earned.

    The rollout stage writes these (one JSON object per line, see :func:`write_records`); the
    fine-tuning stage trains the prompter to write ``prompt`` given ``question`` and
    ``critique`` (hindsight relabelling: the critique becomes the textual reward).

    Attributes:
        question: the question the prompt was written for.
        prompt: the prompt the prompter wrote (the training target).
        critique: the critic's critique of that prompt (the training condition).
        answer: the solver's final answer when given the prompt.
        correct: whether ``answer`` matched the reference (None when unknown).
        reasoning: the solver's reasoning.
        score: the metric's score, for metrics that are not right/wrong.
        reference: the gold answer.
        reward: the textual reward the prompter was conditioned on when it wrote ``prompt``.
        round: TRPrompt round that produced the record.
        example_id: id of the question in its dataset.
        extra: anything else worth keeping (unknown keys of a JSON line land here).
    """

    question: str
    prompt: str
    critique: str
    answer: str = ""
    correct: bool | None = None
    reasoning: str = ""
    score: float | None = None
    reference: str = ""
    reward: str = ""
    round: int | None = None
    example_id: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``extra`` stays nested, so round trips are exact)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutRecord:
        """Build a record from a dict; keys that are not fields are kept in ``extra``.

        Raises:
            RecordError: a required field (question, prompt, critique) is missing.
        """
        if not isinstance(data, Mapping):
            raise RecordError(f"a rollout record must be a JSON object, got {type(data).__name__}")
        names = {field.name for field in dataclasses.fields(cls)}
        missing = [key for key in ("question", "prompt", "critique") if key not in data]
        if missing:
            raise RecordError(f"rollout record lacks {', '.join(missing)}: {dict(data)!r:.200}")
        known = {key: value for key, value in data.items() if key in names and key != "extra"}
        extra = dict(data.get("extra") or {})
        extra.update({key: value for key, value in data.items() if key not in names})
        return cls(**known, extra=extra)


def write_records(path: str | os.PathLike, records: Iterable[RolloutRecord]) -> Path:
    """Write records as JSON lines, atomically (a temporary file renamed into place)."""
    text = "".join(json.dumps(record.to_dict(), ensure_ascii=False) + "\n" for record in records)
    return atomic_write_text(path, text)


def read_records(path: str | os.PathLike) -> list[RolloutRecord]:
    """Read a records file (written by :func:`write_records` or appended by the rollout).

    Blank lines are skipped and a torn last line (the process died while appending it) is
    dropped, as for every JSONL file of a run (:func:`~trprompt_dspy.infra.runs.read_jsonl`).

    Raises:
        RecordError: the file is missing or a line is not a valid record (with its number).
        RunFolderError: a line other than the last is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"records file {path} does not exist")
    records = []
    for number, row in iter_jsonl(path):
        try:
            records.append(RolloutRecord.from_dict(row))
        except (ValueError, TypeError) as error:
            raise RecordError(f"{path}:{number}: not a rollout record: {error}") from error
    return records
