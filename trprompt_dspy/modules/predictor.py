"""The prompter's predictor: a ``dspy.Predict`` that carries the textual reward (t*) and the LoRA
adapter it was trained into as saved state. A leaf: the modules and the saved-program format
build on it."""

from __future__ import annotations

from typing import Any

import dspy

from ..infra.structured import StructuredPredict
from ..prompts.defaults import INITIAL_REWARD
from ..prompts.signatures import GeneratePrompt


class PromptGenerator(StructuredPredict):
    """The prompter's predictor: a ``dspy.Predict`` over ``GeneratePrompt`` that carries the
    current textual reward as part of its saved state (and picks the JSON adapter for a
    ``StructuredLM``, see :class:`~trprompt_dspy.infra.structured.StructuredPredict`).

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
