"""One rollout pass of TRPrompt: prompts -> answers -> scores -> critiques, in parallel.

For every question the prompter samples ``n_samples`` prompts conditioned on the current reward
text; the solver answers with each prompt, the metric scores the answer, and the critic writes
a critique of the prompt. Each (question, prompt, critique, ...) becomes a ``RolloutRecord``:
hindsight relabelling, where the critique is the reward the prompt is later trained under.

Records are appended to a JSONL file as they complete, so a run killed mid-rollout loses only
the requests in flight; passing the same file again skips the (question, sample) pairs it
already holds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import dspy

from ..infra.checks import check_choice, check_ints
from ..infra.parallel import run_parallel
from ..infra.runs import JsonlAppender, RunFolderError, disk_full_error, is_disk_full
from ..infra.scoring import example_id, is_correct, score_prediction
from ..infra.settings import speed_only
from ..modules.roles import QueryAwarePrompter, Solver, TextualCritic
from ..prompts.defaults import NUMERIC_REWARD_TEMPLATE
from .records import RolloutRecord, read_records

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RolloutConfig:
    """Settings of one rollout pass.

    Attributes:
        n_samples: prompts sampled per question (the paper samples several per question so
            that one question yields both good and bad prompts).
        temperature: sampling temperature of the prompter (> 0, or all samples are equal).
        num_threads: questions x samples processed concurrently; a local vLLM server batches
            them, so this is what makes a rollout fast (speed only: not part of a run's
            fingerprint).
        reward: ``"textual"`` (the critic writes a critique) or ``"numeric"`` (the paper's
            numeric-reward ablation: the record's reward is the score, formatted with
            ``reward_template``, and the critic is not called).
        reward_template: how a score is written as the reward text with ``reward="numeric"``
            (``{score}`` is the score in [0, 1]); QPO uses its own wording.
        seed: part of every sample's DSPy ``rollout_id`` (with the round and sample index), so
            runs with other seeds draw other samples instead of sharing DSPy's cached ones
            (``TRPromptConfig.seed`` sets it).
    """

    n_samples: int = 4
    temperature: float = 1.0
    num_threads: int = speed_only(default=16)
    reward: str = "textual"
    reward_template: str = NUMERIC_REWARD_TEMPLATE
    seed: int = 0

    def __post_init__(self) -> None:
        check_ints(self, ("n_samples", "num_threads"))
        if self.temperature <= 0 and self.n_samples > 1:
            raise ValueError("temperature must be > 0 when n_samples > 1 (otherwise every sample is the same)")
        check_choice("reward", self.reward, ("textual", "numeric"))
        try:
            self.reward_template.format(score=1.0)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(f"reward_template must format with {{score}}, got {self.reward_template!r} ({exc})") from None


@dataclasses.dataclass
class RolloutResult:
    """Records of the pass (resumed ones first) and what failed."""

    records: list[RolloutRecord]
    n_new: int
    n_resumed: int
    n_failed: int
    error_counts: dict[str, int]

    @property
    def accuracy(self) -> float:
        """Share of records whose answer was correct (the prompter's training-time accuracy)."""
        return sum(bool(r.correct) for r in self.records) / len(self.records) if self.records else 0.0

    @property
    def answer_in_prompt_rate(self) -> float:
        """Share of records whose prompt gives the gold answer away (its number is in the prompt
        and not in the question: :func:`~trprompt_dspy.metrics.answer_in_text`). Such a prompt
        earns a glowing critique for solving, not for prompting."""
        from ..metrics import answer_in_text

        if not self.records:
            return 0.0
        return sum(answer_in_text(r.prompt, r.reference, r.question) for r in self.records) / len(self.records)

    def summary(self) -> dict[str, Any]:
        return {
            "records": len(self.records), "new": self.n_new, "resumed": self.n_resumed,
            "failed": self.n_failed, "errors": self.error_counts, "accuracy": self.accuracy,
            "answer_in_prompt_rate": self.answer_in_prompt_rate,
        }


def numeric_reward(score: float, template: str = NUMERIC_REWARD_TEMPLATE) -> str:
    """The reward text of the numeric-reward ablation (a score in [0, 1]) or of QPO's return."""
    return template.format(score=float(score))


#: QPO's highest return (:func:`qpo_returns`): a right answer in a round whose answers were all right
QPO_MAX_RETURN = 20.0


def qpo_returns(records: Sequence[RolloutRecord], template: str = NUMERIC_REWARD_TEMPLATE) -> list[RolloutRecord]:
    """ONE round's records relabelled with QPO's return (Kong et al. 2025, ``step1_train.py``):
    ``10 x score + 10 x the mean score of the round's records`` -- the query-level correctness
    plus the prompts' mean accuracy over the queries they were collected on (what QPO's
    ``step3_collect.py`` stores as ``zero_shot_avg_acc`` for its generated prompts). QPO also
    subtracts the target's negative log-probability of the gold answer; these records do not
    hold it, so that term is left out. A (question, prompt) pair that repeats within the round
    is kept once (QPO's ``step4_merge_dataset.py`` de-duplicates the new rows)."""
    scores = [r.score if r.score is not None else float(bool(r.correct)) for r in records]
    mean = sum(scores) / len(scores) if scores else 0.0
    seen: set[tuple[str, str]] = set()
    out = []
    for record, score in zip(records, scores):
        if (record.question, record.prompt) in seen:
            continue
        seen.add((record.question, record.prompt))
        out.append(dataclasses.replace(record, critique=numeric_reward(10 * score + 10 * mean, template)))
    return out


def run_rollout(
    prompter: QueryAwarePrompter,
    solver: Solver,
    critic: TextualCritic | None,
    examples: Sequence[dspy.Example],
    metric: Callable[..., Any],
    *,
    reward: str,
    round_index: int = 0,
    config: RolloutConfig | None = None,
    records_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> RolloutResult:
    """Sample prompts for every example, solve, score and critique them.

    Args:
        prompter, solver, critic: the three roles (each may use its own LM). ``critic`` may be
            None when ``config.reward == "numeric"``.
        examples: questions with ``id``, ``question`` and ``answer``.
        metric: DSPy metric ``metric(example, prediction) -> bool | float``.
        reward: the reward text the prompter is conditioned on in this pass.
        round_index: the TRPrompt round (part of each sample's DSPy ``rollout_id``, so DSPy's
            cache returns a fresh sample per round and sample, and the same one on a re-run).
        config: :class:`RolloutConfig`.
        records_path: JSONL file to append records to as they complete; records already in it
            (same example id and sample index) are kept and not regenerated.

    Returns:
        :class:`RolloutResult`. Items whose prompter or critic reply could not be used are
        counted in ``n_failed``; a solver reply that does not parse is a wrong answer, and its
        prompt still gets a critique (it earned one).
    """
    config = config or RolloutConfig()
    if config.reward == "textual" and critic is None:
        raise ValueError("a TextualCritic is needed when reward='textual'")
    if not examples:
        raise ValueError("run_rollout needs at least one example")
    ids = [example_id(ex, i) for i, ex in enumerate(examples)]
    if len(set(ids)) != len(ids):
        raise ValueError("examples must have distinct ids (records are matched to questions by id)")

    resumed: dict[tuple[str, int], RolloutRecord] = {}
    appender = None
    if records_path is not None:
        for record in read_records(records_path) if Path(records_path).is_file() else []:
            resumed[(str(record.example_id), int(record.extra.get("sample", -1)))] = record
        appender = JsonlAppender(records_path)

    todo = [
        (ex_id, ex, k)
        for ex_id, ex in zip(ids, examples)
        for k in range(config.n_samples)
        if (ex_id, k) not in resumed
    ]
    if resumed:
        logger.info("rollout round %d: %d records resumed, %d to generate", round_index, len(resumed), len(todo))

    def one(item: tuple[str, dspy.Example, int]) -> RolloutRecord:
        ex_id, example, sample = item
        rollout_id = (config.seed * 1_000 + round_index) * 100_000 + sample
        lm_config = {"temperature": config.temperature, "rollout_id": rollout_id}
        prompt = prompter(question=example.question, textual_reward=reward, config=lm_config).prompt
        try:
            solved = solver(question=example.question, prompt=prompt)
            answer, reasoning = str(solved.answer), str(solved.reasoning)
            score = score_prediction(metric, example, solved)
        except dspy.utils.exceptions.AdapterParseError as exc:
            # the prompt led to an unparseable answer: a wrong answer, still worth a critique
            answer, reasoning, score = "", f"(the solver's reply could not be parsed: {str(exc)[:200]})", 0.0
        correct = is_correct(score)
        if config.reward == "numeric":
            critique = numeric_reward(score, config.reward_template)
        else:
            critique = critic(
                question=example.question, prompt=prompt, solver_reasoning=reasoning, solver_answer=answer,
                reference_answer=str(example.answer), is_correct=correct,
            ).critique
        record = RolloutRecord(
            question=example.question, prompt=prompt, critique=critique, answer=answer, correct=correct,
            reasoning=reasoning, score=score, reference=str(example.answer), reward=reward,
            round=round_index, example_id=ex_id, extra={"sample": sample},
        )
        if appender is not None:
            appender.append(record.to_dict())
        return record

    batch = run_parallel(one, todo, num_threads=config.num_threads, progress=progress, desc=f"rollout round {round_index}")
    unwritable = [e for e in batch.errors.values() if isinstance(e, RunFolderError)]
    if unwritable:
        # records that cannot be saved would be generated again on resume: stop, do not go on
        if is_disk_full(unwritable[0]) and appender is not None:
            saved = read_records(appender.path)
            per_record = appender.path.stat().st_size / len(saved) if saved else 4096
            raise disk_full_error(appender.path.parent, f"the rollout ({len(unwritable)} records not saved)",
                                  int(per_record * (len(ids) * config.n_samples - len(saved)))) from unwritable[0]
        raise RunFolderError(f"{len(unwritable)} rollout records could not be saved: {unwritable[0]}")
    new = [r for r in batch.outputs if r is not None]
    # question order, then sample order: the same order whether records were resumed or not
    position = {ex_id: i for i, ex_id in enumerate(ids)}
    records = sorted(
        [r for r in resumed.values() if str(r.example_id) in position] + new,
        key=lambda r: (position[str(r.example_id)], r.extra.get("sample", 0)),
    )
    return RolloutResult(
        records=records, n_new=len(new), n_resumed=len(resumed), n_failed=batch.n_errors,
        error_counts=batch.error_counts(),
    )


def records_path_for(round_dir: str | os.PathLike) -> Path:
    """Where a round's rollout records live inside its run folder."""
    return Path(round_dir) / "records.jsonl"
