"""Baselines TRPrompt is compared with, built on the same modules, serving and fine-tuning.

- :class:`ZeroShot`, :class:`ZeroShotCoT`, :func:`untrained_prompter` -- no optimization.
- :class:`QPOTeleprompter` -- QPO (Kong et al., TMLR 2025), re-implemented: reward-conditioned
  LoRA SFT of the same prompter on numeric returns, multi-loop (see its docstring for how it
  differs from the original).
- :func:`textgrad_instruction` and :func:`copro_instruction` -- task-level instruction
  optimization (one instruction for every question), with TextGrad and with DSPy's COPRO.
- :func:`gepa_instruction` and :func:`mipro_instruction` -- the optimizers DSPy users run,
  ``dspy.GEPA`` and ``dspy.MIPROv2``, on the same instruction.
"""

from .dspy_optimizers import feedback_metric, gepa_instruction, mipro_calls, mipro_instruction, mipro_trials
from .instruction import (
    FixedPrompter,
    TaskInstructionProgram,
    copro_instruction,
    textgrad_instruction,
)
from .qpo import QPO_REWARD_TEMPLATE, QPOTeleprompter
from .simple import ZeroShot, ZeroShotCoT, untrained_prompter

__all__ = [
    "FixedPrompter",
    "QPOTeleprompter",
    "QPO_REWARD_TEMPLATE",
    "TaskInstructionProgram",
    "ZeroShot",
    "ZeroShotCoT",
    "copro_instruction",
    "feedback_metric",
    "gepa_instruction",
    "mipro_calls",
    "mipro_instruction",
    "mipro_trials",
    "textgrad_instruction",
    "untrained_prompter",
]
