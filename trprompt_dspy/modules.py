"""DSPy modules of TRPrompt: the query-aware prompter, the textual critic, the solver, and the
default program (prompter + solver) that ``TRPromptTeleprompter`` compiles.

Each module works on its own with any ``dspy.LM`` (``module.set_lm(lm)`` or the ``lm=`` argument),
so the prompter, the target (solver) and the critic can be three different models.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dspy

from .prompts import INITIAL_REWARD
from .signatures import CritiquePrompt, GeneratePrompt, SolveWithPrompt
from .structured import StructuredPredict

logger = logging.getLogger(__name__)

#: File name of a program's state inside a saved program folder.
PROGRAM_STATE_FILE = "program.json"


class PromptGenerator(StructuredPredict):
    """The prompter's predictor: a ``dspy.Predict`` over ``GeneratePrompt`` that carries the
    current textual reward as part of its saved state (and picks the JSON adapter for a
    ``StructuredLM``, see :class:`~trprompt_dspy.structured.StructuredPredict`).

    Keeping the reward inside the predictor (a DSPy ``Parameter``) means it is saved and loaded
    by ``save``/``load`` of *any* program that contains the prompter, not only of
    ``QueryAwarePrompter`` itself.
    """

    def __init__(self, signature: Any = GeneratePrompt, reward: str = INITIAL_REWARD, **config: Any):
        super().__init__(signature, **config)
        self.reward = _check_reward(reward)
        #: the LoRA adapter this predictor was trained into (``{"name", "path", "base_model"}``),
        #: None before training; kept in the saved state so a loaded program can be served again
        self.adapter: dict[str, str] | None = None

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        if kwargs.get("textual_reward") is None:
            kwargs["textual_reward"] = self.reward
        return super().forward(**kwargs)

    async def aforward(self, **kwargs: Any) -> dspy.Prediction:
        if kwargs.get("textual_reward") is None:
            kwargs["textual_reward"] = self.reward
        return await super().aforward(**kwargs)

    def dump_state(self, json_mode: bool = True) -> dict:
        state = super().dump_state(json_mode=json_mode)
        state["reward"] = self.reward
        state["adapter"] = dict(self.adapter) if self.adapter else None
        return state

    def load_state(self, state: dict, *, allow_unsafe_lm_state: bool = False) -> "PromptGenerator":
        reward = state.get("reward", self.reward)
        _check_reward(reward)
        adapter = _check_adapter(state.get("adapter"))
        super().load_state(state, allow_unsafe_lm_state=allow_unsafe_lm_state)
        self.reward = reward
        self.adapter = adapter
        return self


def _check_reward(reward: Any) -> str:
    if not isinstance(reward, str) or not reward.strip():
        raise ValueError(f"the textual reward must be a non-empty string, got {reward!r}")
    return reward


def _check_adapter(adapter: Any) -> dict[str, str] | None:
    if adapter is None:
        return None
    if not (isinstance(adapter, dict) and {"name", "path", "base_model"} <= adapter.keys()
            and all(isinstance(adapter[k], str) and adapter[k] for k in ("name", "path", "base_model"))):
        raise ValueError(f"adapter state must be a dict with string name, path and base_model, got {adapter!r}")
    return {k: adapter[k] for k in ("name", "path", "base_model")}


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


class TRPromptProgram(dspy.Module):
    """The default program TRPrompt compiles: the prompter writes a prompt for the question, the
    solver answers with it. Returns ``Prediction(prompt, reasoning, answer)``.

    ``save(folder)`` (a path without a suffix) writes the program state as JSON, the prompter's
    LoRA adapter and a manifest into the folder (``trprompt_dspy.compiled``), never a pickle;
    ``load(folder)`` restores them. ``save("x.json")``/``load("x.json")`` behave as in DSPy.
    """

    def __init__(self, prompter: QueryAwarePrompter | None = None, solver: Solver | None = None):
        super().__init__()
        self.prompter = prompter if prompter is not None else QueryAwarePrompter()
        self.solver = solver if solver is not None else Solver()

    def forward(self, question: str) -> dspy.Prediction:
        prompt = self.prompter(question=question).prompt
        solved = self.solver(question=question, prompt=prompt)
        return dspy.Prediction(prompt=prompt, reasoning=solved.reasoning, answer=solved.answer)

    def save(self, path: str | Path, save_program: bool = False, modules_to_serialize: Any = None) -> None:
        path = Path(path)
        if not save_program and not path.suffix:
            from .compiled import save_compiled

            save_compiled(self, path)  # JSON state + the prompter's adapter + a manifest
            return
        super().save(path, save_program=save_program, modules_to_serialize=modules_to_serialize)

    def load(self, path: str | Path, allow_pickle: bool = False, allow_unsafe_lm_state: bool = False) -> None:
        path = Path(path)
        if path.is_dir():
            from .compiled import load_compiled

            load_compiled(self, path, allow_unsafe_lm_state=allow_unsafe_lm_state, allow_pickle=allow_pickle)
            return
        super().load(path, allow_pickle=allow_pickle, allow_unsafe_lm_state=allow_unsafe_lm_state)
