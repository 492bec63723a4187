"""The three roles of TRPrompt as DSPy modules: the query-aware prompter, the textual critic and
the solver (the target).

Each module works on its own with any ``dspy.LM`` (``module.set_lm(lm)`` or the ``lm=`` argument),
so the prompter, the target (solver) and the critic can be three different models.
"""

from __future__ import annotations

from typing import Any

import dspy

from ..infra.structured import StructuredPredict
from ..prompts.defaults import INITIAL_REWARD
from ..prompts.signatures import CritiquePrompt, GeneratePrompt, SolveWithPrompt
from .predictor import PromptGenerator, _check_adapter, _check_reward


class QueryAwarePrompter(dspy.Module):
    """Writes a prompt for each question, conditioned on a textual reward.

    The reward is module state (``prompter.reward``): a pipeline calls ``prompter(question=...)``
    and gets ``Prediction(prompt=...)``. TRPrompt sets the reward to the optimal textual reward t*
    it found; ``textual_reward=`` overrides it for one call (used in training rollouts).

    Args:
        reward: the textual reward to condition on (default: ``prompts.INITIAL_REWARD``).
        lm: the LM that writes prompts (default: the LM configured with ``dspy.configure``).
        signature: a signature with inputs ``question``, ``textual_reward`` and output ``prompt``.
        **config: LM settings for the predictor (e.g. ``temperature``, ``max_tokens``).
    """

    def __init__(
        self,
        reward: str = INITIAL_REWARD,
        *,
        lm: dspy.BaseLM | None = None,
        signature: Any = GeneratePrompt,
        **config: Any,
    ):
        super().__init__()
        self.generate = PromptGenerator(signature, reward=reward, **config)
        if lm is not None:
            self.generate.lm = lm

    @property
    def reward(self) -> str:
        """The textual reward every call is conditioned on (saved with the program)."""
        return self.generate.reward

    @reward.setter
    def reward(self, value: str) -> None:
        self.generate.reward = _check_reward(value)

    @property
    def adapter(self) -> dict[str, str] | None:
        """The LoRA adapter of a compiled prompter (``{"name", "path", "base_model"}``) or None."""
        return self.generate.adapter

    @adapter.setter
    def adapter(self, value: dict[str, str] | None) -> None:
        self.generate.adapter = _check_adapter(value)

    def forward(self, question: str, textual_reward: str | None = None, **kwargs: Any) -> dspy.Prediction:
        return self.generate(question=question, textual_reward=textual_reward, **kwargs)


class TextualCritic(dspy.Module):
    """The textual reward model: reads a question, the prompt, the solver's output, the reference
    answer and its correctness, and writes a critique of the PROMPT in natural language.

    Args:
        lm: the critic LM (default: the configured LM).
        signature: a signature shaped like ``CritiquePrompt``.
        **config: LM settings for the predictor.
    """

    def __init__(self, *, lm: dspy.BaseLM | None = None, signature: Any = CritiquePrompt, **config: Any):
        super().__init__()
        self.critique = StructuredPredict(signature, **config)
        if lm is not None:
            self.critique.lm = lm

    def forward(
        self,
        question: str,
        prompt: str,
        solver_reasoning: str,
        solver_answer: str,
        reference_answer: str,
        is_correct: bool,
        **kwargs: Any,
    ) -> dspy.Prediction:
        return self.critique(
            question=question,
            prompt=prompt,
            solver_reasoning=solver_reasoning or "",
            solver_answer=solver_answer or "",
            reference_answer=reference_answer,
            is_correct=bool(is_correct),
            **kwargs,
        )


class Solver(dspy.Module):
    """The target: answers a question following a prompt, giving ``reasoning`` and ``answer``.

    Args:
        lm: the target LM (default: the configured LM).
        signature: a signature shaped like ``SolveWithPrompt``.
        **config: LM settings for the predictor.
    """

    def __init__(self, *, lm: dspy.BaseLM | None = None, signature: Any = SolveWithPrompt, **config: Any):
        super().__init__()
        self.solve = StructuredPredict(signature, **config)
        if lm is not None:
            self.solve.lm = lm

    def forward(self, question: str, prompt: str = "", **kwargs: Any) -> dspy.Prediction:
        return self.solve(question=question, prompt=prompt or "", **kwargs)


#: The role each module plays, as usage reports name it (``UsageMeter(MODULE_ROLES)``).
MODULE_ROLES: dict[type, str] = {QueryAwarePrompter: "prompter", Solver: "target", TextualCritic: "critic"}
