"""Task-level instruction optimization: ONE instruction for every question, for contrast with
TRPrompt's query-specific prompts.

- :func:`textgrad_instruction` -- TextGrad on the instruction the Solver receives. It reuses the
  reward search (``reward_search.search_reward``) with a :class:`FixedPrompter` that hands the
  optimized text to the Solver unchanged, and with role texts that describe an instruction.
- :func:`copro_instruction` -- DSPy's COPRO optimizer on the Solver's signature instruction.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import dspy

from ..modules.roles import QueryAwarePrompter, Solver
from ..prompts.defaults import ZERO_SHOT_COT_PROMPT
from ..prompts.instruction import (
    INSTRUCTION_CONSTRAINTS,
    INSTRUCTION_FUNCTION_PURPOSE,
    INSTRUCTION_ROLE_DESCRIPTION,
)
from ..reward_search import RewardSearchConfig, search_reward


class FixedPrompter(QueryAwarePrompter):
    """A "prompter" that gives every question the same prompt: its ``reward`` text itself.

    With it, the reward search optimizes a task-level instruction, and the compiled program
    (:class:`TaskInstructionProgram`) runs with no prompter LM call at all.
    """

    def forward(self, question: str, textual_reward: str | None = None, **kwargs: Any) -> dspy.Prediction:
        return dspy.Prediction(prompt=textual_reward if textual_reward is not None else self.reward)


class TaskInstructionProgram(dspy.Module):
    """The Solver with one fixed instruction (``program.prompter.reward``) for every question."""

    def __init__(self, instruction: str = ZERO_SHOT_COT_PROMPT, solver: Solver | None = None) -> None:
        super().__init__()
        self.prompter = FixedPrompter(reward=instruction)
        self.solver = solver or Solver()

    def forward(self, question: str) -> dspy.Prediction:
        prompt = self.prompter(question=question).prompt
        solved = self.solver(question=question, prompt=prompt)
        return dspy.Prediction(prompt=prompt, reasoning=solved.reasoning, answer=solved.answer)


def textgrad_instruction(
    trainset: Sequence[dspy.Example],
    metric: Callable[..., Any],
    *,
    optimizer_lm: Any,
    solver: Solver | None = None,
    config: RewardSearchConfig | None = None,
    initial_instruction: str = ZERO_SHOT_COT_PROMPT,
    run_dir: str | os.PathLike | None = None,
) -> tuple[TaskInstructionProgram, Any]:
    """TextGrad search of one instruction for the Solver. Returns (program, search result).

    The search settings (steps, candidates, minibatch) are those of :class:`RewardSearchConfig`,
    so the budget matches TRPrompt's t* search when the same config is passed.
    """
    config = dataclasses.replace(
        config or RewardSearchConfig(),
        role_description=INSTRUCTION_ROLE_DESCRIPTION,
        function_purpose=INSTRUCTION_FUNCTION_PURPOSE,
        constraints=INSTRUCTION_CONSTRAINTS,
        min_reward_chars=min((config or RewardSearchConfig()).min_reward_chars, len(initial_instruction)),
    )
    program = TaskInstructionProgram(initial_instruction, solver=solver)
    result = search_reward(program.prompter, program.solver, trainset, metric, optimizer_lm=optimizer_lm,
                           config=config, run_dir=run_dir, initial_reward=initial_instruction)
    program.prompter.reward = result.best_reward
    return program, result


def copro_instruction(
    trainset: Sequence[dspy.Example],
    metric: Callable[..., Any],
    *,
    prompt_lm: Any,
    solver: Solver | None = None,
    breadth: int = 3,
    depth: int = 1,
    init_temperature: float = 1.0,
    num_threads: int = 16,
) -> dspy.Module:
    """DSPy's COPRO on the Solver's signature instruction (the prompt input stays empty).

    Returns the optimized ``ZeroShot`` program. COPRO evaluates ``breadth`` candidates per
    depth step on the whole trainset: its budget is ``breadth x depth x len(trainset)`` solver calls.
    """
    from dspy.teleprompt import COPRO

    from .simple import ZeroShot

    student = ZeroShot(solver)
    optimizer = COPRO(prompt_model=prompt_lm, metric=metric, breadth=breadth, depth=depth,
                      init_temperature=init_temperature, track_stats=False)
    return optimizer.compile(student, trainset=list(trainset),
                             eval_kwargs={"num_threads": num_threads, "display_progress": False})
