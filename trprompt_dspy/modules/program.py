"""The default program TRPrompt compiles (prompter + solver), saved and loaded with its adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dspy

from .compiled import load_compiled, save_compiled
from .roles import QueryAwarePrompter, Solver


class TRPromptProgram(dspy.Module):
    """The default program TRPrompt compiles: the prompter writes a prompt for the question, the
    solver answers with it. Returns ``Prediction(prompt, reasoning, answer)``.

    ``save(folder)`` (a path without a suffix) writes the program state as JSON, the prompter's
    LoRA adapter and a manifest into the folder (``trprompt_dspy.modules.compiled``), never a pickle;
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
            save_compiled(self, path)  # JSON state + the prompter's adapter + a manifest
            return
        super().save(path, save_program=save_program, modules_to_serialize=modules_to_serialize)

    def load(self, path: str | Path, allow_pickle: bool = False, allow_unsafe_lm_state: bool = False) -> None:
        path = Path(path)
        if path.is_dir():
            load_compiled(self, path, allow_unsafe_lm_state=allow_unsafe_lm_state, allow_pickle=allow_pickle)
            return
        super().load(path, allow_pickle=allow_pickle, allow_unsafe_lm_state=allow_unsafe_lm_state)
