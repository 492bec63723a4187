"""Baselines without optimization: the solver alone, zero-shot CoT, and the untrained prompter."""

from __future__ import annotations

import dspy

from ..modules.program import TRPromptProgram
from ..modules.roles import Solver
from ..prompts.defaults import ZERO_SHOT_COT_PROMPT


class ZeroShot(dspy.Module):
    """The Solver with the question only (an empty prompt)."""

    def __init__(self, solver: Solver | None = None) -> None:
        super().__init__()
        self.solver = solver or Solver()

    def forward(self, question: str) -> dspy.Prediction:
        return self.solver(question=question, prompt="")


class ZeroShotCoT(dspy.Module):
    """Zero-shot chain of thought (Kojima et al. 2022): the Solver with "Let's think step by step."."""

    def __init__(self, solver: Solver | None = None, prompt: str = ZERO_SHOT_COT_PROMPT) -> None:
        super().__init__()
        self.solver = solver or Solver()
        self.prompt = prompt

    def forward(self, question: str) -> dspy.Prediction:
        return self.solver(question=question, prompt=self.prompt)


def untrained_prompter() -> TRPromptProgram:
    """The base prompter model writing query-specific prompts, conditioned on the initial reward,
    with no fine-tuning: what training adds is the difference to the compiled program."""
    return TRPromptProgram()
