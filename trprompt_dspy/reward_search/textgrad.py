"""The TextGrad glue of the search: t* as a variable, its gradient, and k proposals from it.

:func:`textual_gradient` builds the small graph of one step: t* (a :class:`RewardVariable`) is
the input of a ``StringBasedFunction`` whose output is the minibatch results text (the forward
ran outside TextGrad, in parallel, and the function replays it), optionally followed by an LLM
evaluation (TextGrad's ``TextLoss``); ``backward`` asks the optimizer LM for feedback on t*.
:func:`propose_candidates` sends TextGrad's ``TextualGradientDescent`` update prompt k times in
parallel threads (the first greedy, the others sampled) without applying any reply;
:func:`parse_improved_variable` validates each reply as text, never evaluating it, and
:func:`reject_answer_leaks` rejects a candidate that writes a gold answer of the gradient's minibatch.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from ..infra.parallel import run_parallel
from ..infra.textgrad_engine import tg
from ..metrics import answer_in_text
from ..prompts.reward_search import IMPROVED_VARIABLE_TAGS
from .config import RewardSearchConfig
from .results import error_text
from .trace import CandidateRecord, short_reply


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


def reject_answer_leaks(candidates: Sequence[Any], rows: Sequence[dict[str, Any]]) -> None:
    """Reject each still-valid candidate that writes the gold answer of a question of the gradient
    minibatch (shown to the optimizer LM with its reference): such a t* would teach the prompter
    to put answers in prompts, so a gain would measure solving, not prompting. A number that is
    also in that question is not a leak (:func:`~trprompt_dspy.metrics.answer_in_text`)."""
    for c in candidates:
        if c.reason is not None:
            continue
        leaked = [r["id"] for r in rows if answer_in_text(c.reward, r.get("reference"), r.get("question"))]
        if leaked:
            c.reason = f"gives away the gold answer of minibatch question(s) {', '.join(map(str, leaked[:5]))}"


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


def textual_gradient(reward: str, results: str, *, config: RewardSearchConfig, engine: Any) -> tuple[Any, str, str]:
    """Build the TextGrad graph of one minibatch's ``results`` text, run backward on ``engine``
    and return ``(t*, loss, gradient)``: the variable (holding the gradient), the loss text and
    TextGrad's feedback on t*.

    Raises whatever the optimizer LM raises (the caller records it).
    """
    t_star = RewardVariable(reward, requires_grad=True, role_description=config.role_description)
    # The forward pass already ran (in parallel, through DSPy); the function replays its
    # output so that TextGrad's backward knows how t* produced these results.
    forward = tg.autograd.StringBasedFunction(lambda textual_reward: results, function_purpose=config.function_purpose)
    out = forward(inputs={"textual_reward": t_star}, response_role_description=config.results_role_description)
    loss = out
    if config.llm_evaluation:
        loss = tg.TextLoss(config.evaluation_system_prompt, engine=engine)(out)
    _backward(loss, engine)
    return t_star, loss.value, t_star.get_gradient_text()


def propose_candidates(
    t_star: Any,
    step: int,
    *,
    config: RewardSearchConfig,
    engine: Any,
    extra_body: dict | None = None,
) -> list[CandidateRecord]:
    """``config.num_candidates`` TGD proposals from the gradient on ``t_star``, in parallel.

    Never raises: an LM error, a reply without a valid t* (see :func:`parse_improved_variable`),
    the current t* again or a duplicate is recorded with its reason. ``step`` keys the samples in
    DSPy's cache (with ``config.seed``); ``extra_body`` (the structured-output regex) is sent
    with every call.
    """
    cfg = config
    kwargs: dict[str, Any] = {
        "engine": engine,
        "constraints": [c.format(max_chars=cfg.max_reward_chars) for c in cfg.constraints],
        "new_variable_tags": list(IMPROVED_VARIABLE_TAGS),
    }
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
        if extra_body is not None:
            settings["extra_body"] = extra_body
        started = time.perf_counter()
        reply = proposer.propose(**settings)
        return reply, time.perf_counter() - started

    batch = run_parallel(
        one, records, num_threads=min(cfg.num_candidates, cfg.num_threads), desc="propose", progress=False
    )
    seen: dict[str, int] = {}
    for i, record in enumerate(records):
        if i in batch.errors:
            record.reason = f"LM error: {error_text(batch.errors[i])}"
            continue
        reply, record.seconds = batch.outputs[i]
        value, reason = parse_improved_variable(reply, min_chars=cfg.min_reward_chars, max_chars=cfg.max_reward_chars)
        if value is None:
            record.reason, record.reply = reason, short_reply(reply)
            continue
        record.reward = value
        if value == t_star.value:
            record.reason = "unchanged (same as the current reward)"
        elif value in seen:
            record.reason = f"duplicate of candidate {seen[value]}"
        else:
            seen[value] = i
    return records


__all__ = [
    "IMPROVED_VARIABLE_TAGS", "RewardProposer", "RewardVariable", "parse_improved_variable", "propose_candidates",
    "textual_gradient",
]
