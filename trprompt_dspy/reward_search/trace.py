"""What a reward search records: batch scores, candidates, steps, the result, and its files.

The trace is saved into the search's ``run_dir`` after every step (:func:`write_trace`), each
file rewritten atomically, so a killed search leaves the trace of its last completed step:

    reward_search.json   status, config, optimizer LM and the whole :class:`RewardSearchResult`
    best_reward.json     the best t* so far with its accuracy (what a caller usually wants)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..infra.runs import atomic_write_json, read_json

#: File names inside ``run_dir``.
TRACE_FILE = "reward_search.json"
BEST_REWARD_FILE = "best_reward.json"
#: Longest optimizer reply kept in the trace (enough to see why it was rejected).
MAX_REPLY_CHARS_IN_TRACE = 2000


@dataclass
class BatchScore:
    """Score of one reward on one set of questions."""

    n: int
    total: float
    n_errors: int = 0
    error_counts: dict[str, int] = field(default_factory=dict)
    #: True when every item failed and no failure was a parse error: the LM could not be
    #: reached (or the program is broken), so the accuracy means nothing.
    failed: bool = False

    @property
    def accuracy(self) -> float:
        return self.total / self.n if self.n else 0.0

    @classmethod
    def of_rows(cls, rows: Sequence[dict]) -> BatchScore:
        """The score of evaluated rows (``score`` and ``error_type`` of each, see ``forward``)."""
        errors = [r["error_type"] for r in rows if r.get("error_type")]
        counts: dict[str, int] = {}
        for e in errors:
            counts[e] = counts.get(e, 0) + 1
        failed = bool(rows) and len(errors) == len(rows) and "parse" not in counts
        return cls(n=len(rows), total=sum(r["score"] for r in rows), n_errors=len(errors),
                   error_counts=counts, failed=failed)


@dataclass
class CandidateRecord:
    """One proposal of one step.

    Attributes:
        index: position among the step's proposals (0 is the greedy one with ``greedy_first``).
        temperature: sampling temperature of the proposal.
        reward: the proposed t* (None when the reply gave none).
        accepted: whether it replaced t*.
        reason: why it was not accepted (None when accepted), e.g. ``"no <IMPROVED_VARIABLE>
            tags"``, ``"empty"``, ``"too long (1500 chars > 1200)"``, ``"LM error: ..."``,
            ``"accuracy fell (2/16 < 3/16 on the minibatch)"``, ``"not selected: ..."``.
        accuracy: accuracy on the selection minibatch (None when not evaluated).
        n_correct: summed metric on the selection minibatch.
        heldout_accuracy: accuracy on the held-out slice (None without one).
        eval_errors: evaluation items that raised (scored as wrong).
        reply: the optimizer's raw reply when no valid t* came out of it (truncated).
        seconds: wall time of the proposal call.
    """

    index: int
    temperature: float
    reward: str | None = None
    accepted: bool = False
    reason: str | None = None
    accuracy: float | None = None
    n_correct: float | None = None
    heldout_accuracy: float | None = None
    eval_errors: int = 0
    reply: str | None = None
    seconds: float = 0.0


@dataclass
class StepRecord:
    """One step of the search. Step 0 is the evaluation of the initial reward (no candidates).

    Attributes:
        step: step number.
        reward: t* at the start of the step.
        gradient_minibatch: ids of the questions the gradient was written from.
        gradient_accuracy: accuracy of ``reward`` on them.
        loss: the textual loss (results text, or the LLM evaluation of it).
        gradient: TextGrad's feedback on t*.
        selection_minibatch: ids of the questions candidates were compared on.
        current_accuracy: accuracy of ``reward`` on the selection minibatch.
        current_heldout_accuracy: accuracy of ``reward`` on the held-out slice.
        candidates: every proposal with its fate.
        accepted: index of the accepted candidate, or None.
        improved: the accepted candidate beat ``reward`` (not just tied).
        error: what went wrong in the step outside candidates (e.g. the gradient call failed).
        seconds: wall time per phase: ``forward`` (selection="same" only), ``gradient``,
            ``propose``, ``evaluate`` (the candidates' batch), ``evaluate_current`` (the current
            t* on the selection minibatch, overlapping the phases before it) and
            ``wait_current`` (how long the step then still waited for it), ``total``.
    """

    step: int
    reward: str
    gradient_minibatch: list[Any] = field(default_factory=list)
    gradient_accuracy: float | None = None
    loss: str | None = None
    gradient: str | None = None
    selection_minibatch: list[Any] = field(default_factory=list)
    current_accuracy: float | None = None
    current_heldout_accuracy: float | None = None
    candidates: list[CandidateRecord] = field(default_factory=list)
    accepted: int | None = None
    improved: bool = False
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class RewardSearchResult:
    """What :func:`~trprompt_dspy.reward_search.search_reward` returns (and saves into ``run_dir``).

    Attributes:
        best_reward: the t* to condition the prompter on: the last accepted candidate (each
            acceptance required accuracy not to fall), or the initial reward.
        best_accuracy: its held-out accuracy when a held-out slice was used, else its accuracy on
            the last minibatch it was evaluated on (see ``accuracy_source``).
        accuracy_source: ``"heldout"`` or ``"minibatch"``.
        initial_reward: where the search started.
        trace: one :class:`StepRecord` per step, step 0 being the initial evaluation.
        steps_run: TextGrad steps completed.
        stop_reason: ``"steps"``, ``"patience"`` or ``"evaluation_failed: ..."``.
        seconds: wall time of the whole search.
        run_dir: where the trace was saved, if anywhere.
    """

    best_reward: str
    best_accuracy: float
    accuracy_source: str
    initial_reward: str
    trace: list[StepRecord] = field(default_factory=list)
    steps_run: int = 0
    stop_reason: str = "steps"
    seconds: float = 0.0
    run_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the result, trace included."""
        return asdict(self)


def short_reply(reply: str | None) -> str | None:
    """An optimizer reply cut to :data:`MAX_REPLY_CHARS_IN_TRACE` for the trace."""
    if reply is None:
        return None
    return reply if len(reply) <= MAX_REPLY_CHARS_IN_TRACE else reply[:MAX_REPLY_CHARS_IN_TRACE] + "...[cut]"


def write_trace(
    run_dir: str | os.PathLike,
    result: RewardSearchResult,
    *,
    finished: bool,
    config: Any,
    optimizer_lm: str,
    structured_proposals: bool,
) -> None:
    """Save ``result`` (with the search's settings) as :data:`TRACE_FILE` and its best reward as
    :data:`BEST_REWARD_FILE` in ``run_dir``, each atomically; ``status`` is ``"running"`` until
    ``finished``. Values JSON cannot hold are written as their ``str``."""
    run_dir = Path(run_dir)
    status = "finished" if finished else "running"
    atomic_write_json(run_dir / TRACE_FILE, {
        "status": status,
        "config": asdict(config),
        "optimizer_lm": optimizer_lm,
        "structured_proposals": structured_proposals,
        **result.to_dict(),
    })
    atomic_write_json(run_dir / BEST_REWARD_FILE, {
        "reward": result.best_reward, "accuracy": result.best_accuracy,
        "accuracy_source": result.accuracy_source, "steps_run": result.steps_run, "status": status,
    })


def read_trace(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved :data:`TRACE_FILE` of ``run_dir`` as a dict (see :func:`write_trace`), or None
    when there is none."""
    return read_json(Path(run_dir) / TRACE_FILE)


def read_best_reward(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved :data:`BEST_REWARD_FILE` of ``run_dir`` (``reward``, ``accuracy``,
    ``accuracy_source``, ``steps_run``, ``status``), or None when there is none."""
    return read_json(Path(run_dir) / BEST_REWARD_FILE)


__all__ = [
    "BEST_REWARD_FILE", "BatchScore", "CandidateRecord", "RewardSearchResult", "StepRecord", "TRACE_FILE",
    "read_best_reward", "read_trace", "write_trace",
]
