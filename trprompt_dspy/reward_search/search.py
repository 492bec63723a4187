"""Search of the optimal textual reward t* with TextGrad: parallel, and robust to weak models.

After each fine-tuning round TRPrompt looks for the textual reward t* that, given to the
prompter, makes the target most accurate. One step of :func:`search_reward`:

1. **Forward.** ``prompter(question, t*) -> solver -> metric`` for every question of a
   minibatch, all in parallel (DSPy's executor, ``num_threads``).
2. **Loss and gradient.** The minibatch results become a textual evaluation (accuracy, the
   failed questions with their prompts, answers and reference answers, and the questions
   answered correctly). It is a node of a TextGrad graph whose input is t* (a
   ``StringBasedFunction``: the forward ran outside TextGrad, in parallel, and the function
   records it), optionally followed by an LLM evaluation (TextGrad's ``TextLoss``).
   ``loss.backward()`` asks the optimizer LM for feedback on t*.
3. **k proposals.** TextGrad's ``TextualGradientDescent`` update prompt is sent k times in
   parallel threads (the first greedy, the others sampled), giving up to k new t*. A reply
   without the ``<IMPROVED_VARIABLE>`` tags, an empty or absurdly long one, or an LM error
   leaves t* as it was and is recorded with the reason. With a vLLM-served optimizer the tags
   are enforced with a structured-output regex, so small models comply.
4. **Selection.** All valid candidates are evaluated in ONE parallel batch, and (with
   ``selection="next"``) the current t* on the same questions in the background while the
   gradient and proposals are made. Where
   the LM server has spare throughput (a GPU, an API) a step thus costs about one minibatch
   evaluation of wall time whatever k is; a CPU server that one minibatch already saturates
   pays for the extra work, though far less than a sequential search does
   (``benchmarks/reward_search_speed.py``). The best candidate replaces t* only if its
   accuracy does not fall (ties accepted by default), on the minibatch and on a held-out slice
   if one is configured. ``patience`` steps without a strict improvement stop the search.

By default (``selection="next"``) candidates are compared with the current t* on the NEXT
minibatch: a fresh sample, not the one whose failures the gradient was written from (which
favours candidates that fit those questions), and the winner's results on it are the forward
pass of the next step, so no evaluation is wasted. ``selection="same"`` compares on the
gradient's own minibatch (the literal reading of "kept only if minibatch accuracy does not
fall"), at the cost of a separate forward pass per step.

Everything is recorded: :class:`RewardSearchResult` holds the best t*, its accuracy and a trace
of every step and candidate (accepted or not, and why), saved as JSON into ``run_dir`` after
every step. Model output is only ever parsed as text, never evaluated.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import dspy

from ..errors import TRPromptError
from ..infra.textgrad_engine import DSPyEngine, is_hosted_vllm, regex_extra_body
from .config import RewardSearchConfig
from .forward import evaluate_rewards
from .results import error_text, format_accuracy, format_total, results_text
from .sampling import MinibatchSampler, split_trainset
from .textgrad import propose_candidates, reject_answer_leaks, textual_gradient
from .trace import (
    BatchScore,
    CandidateRecord,
    RewardSearchResult,
    StepRecord,
    write_trace,
)

logger = logging.getLogger(__name__)


class RewardSearchError(TRPromptError, RuntimeError):
    """The search cannot start or go on for a reason other than model output (e.g. every call
    of the initial evaluation failed because the LM endpoint is down)."""


@dataclass
class SearchState:
    """Where a search stands between steps (see :meth:`RewardSearch.start` / :meth:`RewardSearch.step`).

    Attributes:
        reward: the current t*.
        sampler: draws the minibatches.
        heldout: the held-out questions (empty without).
        run_path: where the trace is saved, or None.
        result: the result so far (trace included).
        forward_batch / forward_rows / forward_score: the current t*'s results on the minibatch
            the next gradient is computed from (None: a new forward pass is needed).
        current_heldout: the current t*'s held-out score.
        latest_accuracy: the current t*'s accuracy on the last minibatch it was evaluated on.
        stale: consecutive steps without improvement (for ``patience``).
        stop_reason: set when the search cannot go on.
    """

    reward: str
    sampler: MinibatchSampler
    heldout: list
    run_path: Path | None
    result: RewardSearchResult
    forward_batch: list | None = None
    forward_rows: list[dict] | None = None
    forward_score: BatchScore | None = None
    current_heldout: BatchScore | None = None
    latest_accuracy: float = 0.0
    stale: int = 0
    stop_reason: str | None = None


class RewardSearch:
    """The optimal textual reward search; :func:`search_reward` is the one-call form.

    Args:
        prompter: a ``QueryAwarePrompter`` (called as ``prompter(question=..., textual_reward=...)``
            and returning ``.prompt``). It is not modified.
        solver: a ``Solver`` (``solver(question=..., prompt=...)`` returning ``.answer``, and
            ``.reasoning`` if it has one).
        metric: ``metric(example, prediction, trace=None)``; bool or a score in [0, 1].
        optimizer_lm: the ``dspy.LM`` that writes TextGrad's feedback and proposals.
        config: a :class:`RewardSearchConfig` (defaults if None).
    """

    def __init__(
        self,
        prompter: Any,
        solver: Any,
        metric: Callable[..., Any],
        *,
        optimizer_lm: Any,
        config: RewardSearchConfig | None = None,
    ):
        if optimizer_lm is None:
            raise ValueError("search_reward needs an optimizer_lm (a dspy.LM for TextGrad's feedback and proposals)")
        if not callable(metric):
            raise TypeError(f"metric must be callable, got {metric!r}")
        self.prompter, self.solver, self.metric = prompter, solver, metric
        self.config = config if config is not None else RewardSearchConfig()
        self.optimizer_lm = optimizer_lm
        cfg = self.config
        self.feedback_engine = DSPyEngine(
            optimizer_lm, temperature=cfg.feedback_temperature, max_tokens=cfg.feedback_max_tokens
        )
        self.proposal_engine = DSPyEngine(optimizer_lm, max_tokens=cfg.proposal_max_tokens)
        use_regex = cfg.structured_proposals if cfg.structured_proposals is not None else is_hosted_vllm(optimizer_lm)
        self.proposal_extra_body = regex_extra_body(cfg.proposal_regex()) if use_regex else None

    # ------------------------------------------------------------------ evaluation

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self, jobs: Sequence[tuple[str, Sequence[dspy.Example]]], *, desc: str, progress: bool | None = None
    ) -> list[tuple[list[dict], BatchScore]]:
        """Evaluate several rewards, each on its own questions, in ONE parallel batch.

        Args:
            jobs: ``(reward, examples)`` pairs.
            desc: progress-bar label.
            progress: show a progress bar (default: ``config.progress``).

        Returns:
            ``(rows, score)`` per job, in order.
        """
        cfg = self.config
        return evaluate_rewards(
            self.prompter, self.solver, self.metric, jobs, num_threads=cfg.num_threads, desc=desc,
            progress=cfg.progress if progress is None else progress, straggler_timeout_s=cfg.straggler_timeout_s,
        )

    def _timed_evaluate(self, jobs, desc: str) -> tuple[tuple[list[dict], BatchScore], float]:
        started = time.perf_counter()
        # No bar: it runs beside the candidates' batch, and tqdm's bar registry is not thread-safe
        # (DSPy's executor clears it whenever a batch starts).
        (out,) = self.evaluate(jobs, desc=desc, progress=False)
        return out, time.perf_counter() - started

    # ------------------------------------------------------------------ TextGrad

    def results_text(self, rows: Sequence[dict], score: BatchScore) -> str:
        """The textual evaluation of a minibatch: accuracy, failed questions, correct ones.

        Failed questions come first; items that do not fit ``max_results_chars`` are counted.
        """
        return results_text(rows, score, max_chars=self.config.max_results_chars,
                            max_field_chars=self.config.max_field_chars)

    def gradient(self, reward: str, rows: Sequence[dict], score: BatchScore) -> tuple[Any, str, str]:
        """Build the TextGrad graph for one minibatch, run backward, return (t*, loss, gradient).

        Raises whatever the optimizer LM raises (the caller records it).
        """
        return textual_gradient(reward, self.results_text(rows, score), config=self.config,
                                engine=self.feedback_engine)

    def propose(self, t_star: Any, step: int) -> list[CandidateRecord]:
        """k TGD proposals from the gradient on ``t_star``, in parallel; never raises."""
        return propose_candidates(t_star, step, config=self.config, engine=self.proposal_engine,
                                  extra_body=self.proposal_extra_body)

    # ------------------------------------------------------------------ main loop

    def start(
        self,
        trainset: Sequence[dspy.Example],
        *,
        run_dir: str | os.PathLike | None = None,
        initial_reward: str | None = None,
        heldout: Sequence[dspy.Example] | None = None,
    ) -> SearchState:
        """Split the data and evaluate the initial reward (step 0); return the search state.

        Raises:
            ValueError: too few examples, no initial reward.
            RewardSearchError: every evaluation of the initial reward failed (LM unreachable).
        """
        cfg = self.config
        rng = random.Random(cfg.seed)
        pool, heldout = split_trainset(trainset, heldout, heldout_size=cfg.heldout_size,
                                       minibatch_size=cfg.minibatch_size, rng=rng)
        reward = initial_reward if initial_reward is not None else getattr(self.prompter, "reward", None)
        if not isinstance(reward, str) or not reward.strip():
            raise ValueError("no initial reward: pass initial_reward= or a prompter with a non-empty .reward")
        run_path = Path(run_dir) if run_dir is not None else None
        if run_path is not None:
            run_path.mkdir(parents=True, exist_ok=True)
        state = SearchState(
            reward=reward, sampler=MinibatchSampler(pool, cfg.minibatch_size, rng), heldout=heldout, run_path=run_path,
            result=RewardSearchResult(
                best_reward=reward, best_accuracy=0.0, accuracy_source="heldout" if heldout else "minibatch",
                initial_reward=reward, run_dir=str(run_path) if run_path else None,
            ),
        )

        # The initial reward's forward pass and held-out score, in one batch.
        record = StepRecord(step=0, reward=reward)
        t0 = time.perf_counter()
        state.forward_batch = state.sampler.next()
        jobs = [(reward, state.forward_batch)] + ([(reward, heldout)] if heldout else [])
        evaluated = self.evaluate(jobs, desc="reward search: initial reward")
        state.forward_rows, state.forward_score = evaluated[0]
        if state.forward_score.failed:
            raise RewardSearchError(
                f"every evaluation of the initial reward failed ({state.forward_score.error_counts}); "
                f"first error: {state.forward_rows[0]['error']}"
            )
        state.current_heldout = evaluated[1][1] if heldout else None
        state.latest_accuracy = state.forward_score.accuracy
        record.selection_minibatch = [r["id"] for r in state.forward_rows]
        record.current_accuracy = state.forward_score.accuracy
        record.current_heldout_accuracy = state.current_heldout.accuracy if state.current_heldout else None
        record.seconds = {"evaluate": time.perf_counter() - t0, "total": time.perf_counter() - t0}
        state.result.trace.append(record)
        self._update(state, finished=False)
        logger.info("reward search: the initial reward scores %s on the minibatch%s", format_accuracy(state.forward_score),
                    f", {format_accuracy(state.current_heldout)} held out" if state.current_heldout else "")
        return state

    def step(self, state: SearchState) -> StepRecord:
        """One TextGrad step: gradient, k proposals, one evaluation batch, acceptance.

        Updates ``state`` (t*, the next forward pass, patience counter, result and saved trace)
        and returns the step's record. Sets ``state.stop_reason`` when the current reward could
        no longer be evaluated (the LM went away).
        """
        cfg = self.config
        step = state.result.steps_run + 1
        record = StepRecord(step=step, reward=state.reward)
        t_step = time.perf_counter()
        if state.forward_rows is None:  # selection="same": forward the current t* on a new minibatch
            t0 = time.perf_counter()
            state.forward_batch = state.sampler.next()
            (state.forward_rows, state.forward_score), = self.evaluate(
                [(state.reward, state.forward_batch)], desc=f"reward search step {step}: forward")
            record.seconds["forward"] = time.perf_counter() - t0
            if state.forward_score.failed:
                return self._fail(state, record, t_step, f"forward pass failed: {state.forward_rows[0]['error']}")
        record.gradient_minibatch = [r["id"] for r in state.forward_rows]
        record.gradient_accuracy = state.forward_score.accuracy

        # The current t*'s evaluation on the next minibatch does not depend on the proposals: it
        # runs in the background while the gradient and proposals (a few sequential LM calls that
        # leave a batching server mostly idle) are made.
        current_future = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-search-current") as background:
            if cfg.selection == "next":
                selection_batch = state.sampler.next()
            else:
                selection_batch = state.forward_batch
            if cfg.selection == "next" and cfg.num_threads > 1:
                current_future = background.submit(
                    contextvars.copy_context().run, self._timed_evaluate,
                    [(state.reward, selection_batch)], f"reward search step {step}: current reward",
                )

            # Gradient and proposals. An LM error here loses the step, not the search.
            t0 = time.perf_counter()
            try:
                t_star, record.loss, record.gradient = self.gradient(
                    state.reward, state.forward_rows, state.forward_score)
            except Exception as error:
                t_star = None
                record.error = f"gradient failed: {error_text(error)}"
                logger.warning("reward search step %d: %s", step, record.error)
            record.seconds["gradient"] = time.perf_counter() - t0
            if t_star is not None:
                t0 = time.perf_counter()
                record.candidates = self.propose(t_star, step)
                record.seconds["propose"] = time.perf_counter() - t0
            if cfg.reject_answer_leaks:
                reject_answer_leaks(record.candidates, state.forward_rows)
            valid = [c for c in record.candidates if c.reason is None]

            # Every valid candidate (and its held-out slice) in ONE batch.
            t0 = time.perf_counter()
            jobs = [(state.reward, selection_batch)] if cfg.selection == "next" and current_future is None else []
            for c in valid:
                jobs.append((c.reward, selection_batch))
                if state.heldout:
                    jobs.append((c.reward, state.heldout))
            desc = f"reward search step {step}: {len(valid)} candidate(s)"
            evaluated = self.evaluate(jobs, desc=desc) if jobs else []
            record.seconds["evaluate"] = time.perf_counter() - t0
            if current_future is not None:
                t0 = time.perf_counter()
                (current_rows, current_score), record.seconds["evaluate_current"] = current_future.result()
                record.seconds["wait_current"] = time.perf_counter() - t0
        if cfg.selection == "next":
            if current_future is None:
                (current_rows, current_score), evaluated = evaluated[0], evaluated[1:]
            if current_score.failed:
                return self._fail(state, record, t_step,
                                  f"evaluation of the current reward failed: {current_rows[0]['error']}")
        else:
            current_rows, current_score = state.forward_rows, state.forward_score
        record.selection_minibatch = [r["id"] for r in current_rows]
        record.current_accuracy = current_score.accuracy
        record.current_heldout_accuracy = state.current_heldout.accuracy if state.current_heldout else None

        per_candidate = 2 if state.heldout else 1
        scored = []
        for n, c in enumerate(valid):
            rows, score = evaluated[n * per_candidate]
            ho = evaluated[n * per_candidate + 1][1] if state.heldout else None
            c.accuracy, c.n_correct = score.accuracy, score.total
            c.heldout_accuracy = ho.accuracy if ho else None
            c.eval_errors = score.n_errors + (ho.n_errors if ho else 0)
            scored.append((c, rows, score, ho))
        winner = self._select(scored, current_score, state.current_heldout)

        state.latest_accuracy = current_score.accuracy
        next_rows, next_score = current_rows, current_score
        if winner is not None:
            c, next_rows, next_score, ho = winner
            c.accepted = True
            record.accepted = c.index
            record.improved = next_score.total > current_score.total or bool(
                ho is not None and ho.total > state.current_heldout.total)
            state.reward = c.reward
            state.latest_accuracy = next_score.accuracy
            if ho is not None:
                state.current_heldout = ho
        if cfg.selection == "next":
            # The selection results of the (new) current t* are the next step's forward pass.
            state.forward_batch, state.forward_rows, state.forward_score = selection_batch, next_rows, next_score
        else:
            state.forward_batch, state.forward_rows, state.forward_score = None, None, None
        state.stale = 0 if record.improved else state.stale + 1
        record.seconds["total"] = time.perf_counter() - t_step
        state.result.trace.append(record)
        state.result.steps_run = step
        self._update(state, finished=False)
        logger.info(
            "reward search step %d: %d/%d valid candidates, %s; current reward %s%s (%.1f s)",
            step, len(valid), len(record.candidates),
            (f"accepted #{record.accepted}" + (" (improved)" if record.improved else " (tie)"))
            if record.accepted is not None else "none accepted",
            format_accuracy(current_score), f"; {record.error}" if record.error else "", record.seconds["total"],
        )
        return record

    def run(
        self,
        trainset: Sequence[dspy.Example],
        *,
        run_dir: str | os.PathLike | None = None,
        initial_reward: str | None = None,
        heldout: Sequence[dspy.Example] | None = None,
    ) -> RewardSearchResult:
        """Run the whole search (:meth:`start`, then :meth:`step` until a stop); see :func:`search_reward`."""
        cfg = self.config
        started = time.perf_counter()
        state = self.start(trainset, run_dir=run_dir, initial_reward=initial_reward, heldout=heldout)
        for step in range(1, cfg.steps + 1):
            self.step(state)
            if state.stop_reason is not None:
                break
            if cfg.patience is not None and state.stale >= cfg.patience and step < cfg.steps:
                state.stop_reason = "patience"
                logger.info("reward search: no improvement in %d steps, stopping", state.stale)
                break
        state.result.stop_reason = state.stop_reason or "steps"
        state.result.seconds = time.perf_counter() - started
        self._update(state, finished=True)
        return state.result

    def _fail(self, state: SearchState, record: StepRecord, t_step: float, error: str) -> StepRecord:
        record.error = error
        record.seconds["total"] = time.perf_counter() - t_step
        state.result.trace.append(record)
        state.stop_reason = f"evaluation_failed: {error}"
        self._update(state, finished=False)
        logger.error("reward search stopped at step %d: %s", record.step, error)
        return record

    def _select(self, scored: list, current: BatchScore, current_heldout: BatchScore | None):
        """Mark each evaluated candidate accepted-eligible or rejected; return the winner or None."""
        eligible = []
        for c, rows, score, ho in scored:
            if score.failed or (ho is not None and ho.failed):
                c.reason = f"evaluation failed ({score.error_counts or ho.error_counts})"
            elif score.total < current.total:
                c.reason = (f"accuracy fell ({format_total(score.total)}/{score.n} < "
                            f"{format_total(current.total)}/{current.n} on the minibatch)")
            elif ho is not None and ho.total < current_heldout.total:
                c.reason = (f"held-out accuracy fell ({format_total(ho.total)}/{ho.n} < "
                            f"{format_total(current_heldout.total)}/{current_heldout.n})")
            elif (not self.config.accept_ties and score.total == current.total
                  and (ho is None or ho.total == current_heldout.total)):
                c.reason = "tie with the current reward (accept_ties=False)"
            elif (not self.config.accept_zero_ties and score.total == current.total == 0
                  and (ho is None or ho.total == current_heldout.total == 0)):
                c.reason = "tie at zero accuracy: nothing right to compare (accept_zero_ties=False)"
            else:
                eligible.append((c, rows, score, ho))
        if not eligible:
            return None
        # Most questions right on the held-out slice (questions no adapter was trained on), then
        # on the minibatch; on a tie the lowest index (the greedy proposal first).
        winner = max(eligible, key=lambda e: (e[3].total if e[3] else 0.0, e[2].total, -e[0].index))
        for c, _, score, ho in eligible:
            if c is not winner[0]:
                c.reason = f"not selected: candidate {winner[0].index} scored at least as well"
        return winner

    def _update(self, state: SearchState, *, finished: bool) -> None:
        """Bring the result up to date with the state and save it (atomically) into the run folder."""
        result = state.result
        result.best_reward = state.reward
        result.best_accuracy = state.current_heldout.accuracy if state.current_heldout else state.latest_accuracy
        if state.run_path is not None:
            write_trace(
                state.run_path, result, finished=finished, config=self.config,
                optimizer_lm=getattr(self.optimizer_lm, "model", repr(self.optimizer_lm)),
                structured_proposals=self.proposal_extra_body is not None,
            )


def search_reward(
    prompter: Any,
    solver: Any,
    trainset: Sequence[dspy.Example],
    metric: Callable[..., Any],
    *,
    optimizer_lm: Any,
    config: RewardSearchConfig | None = None,
    run_dir: str | os.PathLike | None = None,
    initial_reward: str | None = None,
    heldout: Sequence[dspy.Example] | None = None,
) -> RewardSearchResult:
    """Search the optimal textual reward t* for ``prompter`` with TextGrad (see the module doc).

    The prompter and solver use their own LMs (or the ones configured with ``dspy.configure`` /
    ``dspy.context``, which reach the worker threads); the optimizer LM writes the gradients and
    proposals. The prompter is not modified: set ``prompter.reward = result.best_reward``.

    Args:
        prompter: a ``QueryAwarePrompter``.
        solver: a ``Solver``.
        trainset: ``dspy.Example`` s with ``question`` and ``answer``.
        metric: ``metric(example, prediction, trace=None)`` (e.g. ``metrics.gsm8k_metric``).
        optimizer_lm: ``dspy.LM`` for TextGrad (feedback and proposals).
        config: :class:`RewardSearchConfig` (defaults if None).
        run_dir: folder for ``reward_search.json`` (config and full trace) and
            ``best_reward.json``, rewritten atomically after every step.
        initial_reward: where to start (default: ``prompter.reward``).
        heldout: explicit held-out questions (default: ``config.heldout_size`` taken from the
            trainset).

    Returns:
        :class:`RewardSearchResult` with ``best_reward``, ``best_accuracy`` and ``trace``.

    Raises:
        ValueError: bad configuration or too few examples for a minibatch.
        RewardSearchError: every evaluation of the initial reward failed (LM unreachable).
    """
    search = RewardSearch(prompter, solver, metric, optimizer_lm=optimizer_lm, config=config)
    return search.run(trainset, run_dir=run_dir, initial_reward=initial_reward, heldout=heldout)


__all__ = ["RewardSearch", "RewardSearchError", "SearchState", "search_reward"]
